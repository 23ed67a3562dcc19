"""The bytes of one update under each encoding, on SmolLM2-135M's real LoRA shapes (the quality benchmark's
adapter, r = 8), against float32; printed and saved as JSON.

    python scripts/bench_encoding_bytes.py [--out scripts/results/encoding-bytes.json]

The quality of each encoding, and its bytes on the tiny model, are in `bench_quality.py --config encodings`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fednode.learning.adapters import LoraTrainer  # noqa: E402
from fednode.learning.models import load_base_model  # noqa: E402
from fednode.learning.settings import LoraSettings  # noqa: E402
from fednode.protocol.encoding import METADATA_KEY, UpdateEncoding  # noqa: E402
from fednode.protocol.packaging import adapter_metadata, pack_adapter  # noqa: E402

ENCODINGS = {"fp16": {"dtype": "float16"}, "bf16": {"dtype": "bfloat16"}, "int8": {"dtype": "int8"},
             "int8-top10": {"dtype": "int8", "top_k": 0.1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "encoding-bytes.json")
    args = ap.parse_args()
    cache = Path(os.environ.get("FEDCHAIN_CACHE", Path.home() / ".cache" / "fedchain"))
    lora = LoraSettings()
    start = LoraTrainer(load_base_model("smollm2", cache), lora).initial_state(0)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in start.items()}
    meta = adapter_metadata("0x" + "ab" * 20, 1, "0x" + "cd" * 20, "e" * 64, lora.to_json(), "update")
    plain = len(pack_adapter(state, meta))
    rows = {"float32": {"bytes": plain, "of_float32": 1.0}}
    for name, table in ENCODINGS.items():
        enc = UpdateEncoding.from_rules(table)
        size = len(pack_adapter(enc.encode(state, start), {**meta, METADATA_KEY: enc.declared()}))
        rows[name] = {"bytes": size, "of_float32": size / plain}
    for name, row in rows.items():
        print(f"{name:<12} {row['bytes']:>10,} bytes  {row['of_float32']:.1%} of float32")
    result = {"model": "smollm2", "lora": lora.to_json(), "parameters": sum(t.numel() for t in start.values()),
              "encodings": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
