"""What secure aggregation costs when nobody attacks, side by side in one run, saved as JSON.

    python scripts/bench_secagg.py [--hospitals 3,10,30] [--round-hospitals 3,10] [--out scripts/results/secagg.json]

1. crypto on SmolLM2-135M LoRA shapes (r=8, the quality benchmark's adapter): per hospital the quantization,
   masks and share dealing, and the reveal; for the aggregator the unmasking (no dropout, and one dropout); all
   against one SmolLM2 local-training round measured in the same run (4 steps of batch 8, as the quality
   benchmark); bytes per hospital per round against the plaintext update;
2. whole rounds on the tiny model through the embedded platform as the demo trains (20 steps of batch 8),
   plaintext and masked, interleaved, with the gas of the unmasking transactions;
3. one of five hospitals dropping out after the share phase: the round finalizes, and the error of the aggregate
   against the plaintext FedAvg of the survivors, with the quantization bound it must stay under.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from eth_account import Account

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fednode.canonical import canonical_json  # noqa: E402
from fednode.learning.adapters import LoraTrainer  # noqa: E402
from fednode.learning.data import DataConfig, build_clients, corpus_texts  # noqa: E402
from fednode.learning.models import load_base_model  # noqa: E402
from fednode.learning.settings import LoraSettings, TrainSettings  # noqa: E402
from fednode.ops.embedded import EmbeddedFederation  # noqa: E402
from fednode.protocol.packaging import adapter_metadata, pack_adapter  # noqa: E402
from fednode.protocol.rules import FederationRules  # noqa: E402
from fednode.protocol.secagg import keys as sk  # noqa: E402
from fednode.protocol.secagg.masking import SecureSettings, quantize, to_state  # noqa: E402
from fednode.protocol.secagg.shares import SurvivorsDocument, mask, reveal  # noqa: E402
from fednode.protocol.secagg.unmask import SecureRound  # noqa: E402
from fednode.storage import EmbeddedStore  # noqa: E402
from research.secure_aggregation import dropout_round, fedavg_error, plain_updates  # noqa: E402

SECURE = {"threshold": 0.6, "clip": 1.0, "scale_bits": 20}
FED = "0x" + "cd" * 20 + ":31337"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def crypto(shapes: dict[str, torch.Tensor], n: int, settings: SecureSettings) -> dict:
    """Hospital 0's masking and reveal and the aggregator's unmasking for `n` hospitals on `shapes`."""
    accounts = [Account.from_key(hashlib.sha256(f"bench-secagg-{i}".encode()).digest()) for i in range(n)]
    keys = {a.address: sk.public_bytes(sk.agreement_key(a, FED)) for a in accounts}
    gen = torch.Generator().manual_seed(n)
    start = {k: torch.zeros_like(v) for k, v in shapes.items()}
    masked, docs, seconds = {}, {}, {}
    for i, a in enumerate(accounts):
        state = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in shapes.items()}

        (masked[a.address], docs[a.address]), took = timed(
            lambda: mask(a, FED, 1, keys, quantize(state, start, settings, 256), settings.shares_needed(n)))
        if i == 0:
            seconds["mask"] = took
    meta = adapter_metadata(FED, 1, accounts[0].address, "b" * 64, {}, "update")
    plain_bytes = len(pack_adapter(shapes, meta))
    masked_bytes = len(pack_adapter(to_state(masked[accounts[0].address], start), meta))
    share_bytes = len(canonical_json(docs[accounts[0].address].model_dump()))
    out = {"hospitals": n, "threshold": settings.shares_needed(n)}
    for label, survivors in (("all", accounts), ("one_dropout", accounts[:-1])):
        doc = SurvivorsDocument(federation=FED, round=1, survivors={a.address: "cid" for a in survivors})
        reveals = []
        for j, a in enumerate(accounts[:-1] if label == "one_dropout" else accounts):
            r, took = timed(lambda: reveal(sk.agreement_key(a, FED), a.address, doc, b"\x01" * 32, docs, keys)[0])
            reveals.append(r)
            if j == 0:
                seconds[f"reveal_{label}"] = took
        sr = SecureRound(settings, sorted(keys, key=str.lower), [a.address for a in survivors], docs, reveals)
        _, seconds[f"unmask_{label}"] = timed(lambda: sr.unmasked_sum({a.address: masked[a.address]
                                                                      for a in survivors}))
        out[f"reveal_bytes_{label}"] = len(canonical_json(reveals[0].model_dump()))
    out.update(seconds=seconds, plaintext_update_bytes=plain_bytes, masked_update_bytes=masked_bytes,
               share_document_bytes=share_bytes,
               bytes_ratio=(masked_bytes + share_bytes + out["reveal_bytes_all"]) / plain_bytes)
    return out


def smollm2_round(cache: Path) -> tuple[dict, float]:
    """SmolLM2's LoRA tensors and the seconds one local round of the quality benchmark takes (4 steps, batch 8)."""
    base = load_base_model("smollm2", cache)
    trainer = LoraTrainer(base, LoraSettings())
    client = build_clients(DataConfig(num_clients=3, train_per_client=64, eval_per_client=8))[0]
    state = trainer.initial_state(0)
    _, took = timed(lambda: trainer.train(client.train, TrainSettings(steps=4), state))
    return state, took


def platform_seconds(seconds: dict) -> float:
    """Everything of a round but training and evaluation: chain, storage, masking, verification, aggregation."""
    return sum(v for k, v in seconds.items() if k not in ("training", "evaluation"))


def rounds(base, hospitals: list[int], settings: dict, repeats: int) -> list[dict]:
    """Whole rounds on the tiny model as the demo runs them (256 training examples, 20 steps of batch 8), plaintext
    and masked interleaved `repeats` times per hospital count; the minimum wall time of each, and the gas of the
    unmasking transactions."""
    lora = LoraSettings(r=4)
    trainer = LoraTrainer(base, lora)
    out = []
    for n in hospitals:
        clients = build_clients(DataConfig(num_clients=n, train_per_client=256, eval_per_client=32))
        row = {"hospitals": n}
        for _ in range(repeats):
            for label, extra in (("plaintext", {}), ("secure", {"secure_aggregation": settings, "copy_threshold": 0})):
                with tempfile.TemporaryDirectory() as tmp:
                    rules = FederationRules(base_model=base.digest, lora=lora.to_json(), **extra)
                    fed = EmbeddedFederation.create([trainer] * n, clients, rules, TrainSettings(steps=20),
                                                    EmbeddedStore(Path(tmp)))
                    fed.start(trainer.initial_state(0))
                    before = fed.aggregator.stopwatch.as_dict()
                    run, took = timed(fed.run_round)
                    assert all(v.accepted for v in run.result.verdicts)
                    if took < row.get(f"{label}_round_s", float("inf")):
                        row[f"{label}_round_s"] = took
                        row[f"{label}_seconds"] = {k: round(v - before.get(k, 0.0), 3)
                                                   for k, v in fed.aggregator.stopwatch.as_dict().items()}
                    if label == "secure":
                        rec = fed.aggregator.ledger.refresh().rounds[run.record.round_id]
                        gas = lambda tx: fed.w3.eth.get_transaction_receipt(tx)["gasUsed"]  # noqa: E731
                        row["gas"] = {"requestUnmask": gas(rec.unmask.tx_hash),
                                      "revealShares": max(gas(r.tx_hash) for r in rec.reveals),
                                      "submitUpdate": max(gas(s.tx_hash) for s in rec.submissions)}
        row["ratio"] = row["secure_round_s"] / row["plaintext_round_s"]
        # the same training runs in both (same seeds): the platform's extra seconds are the noise-robust cost
        extra = platform_seconds(row["secure_seconds"]) - platform_seconds(row["plaintext_seconds"])
        row["platform_extra_s"] = extra
        row["ratio_platform"] = (row["plaintext_round_s"] + extra) / row["plaintext_round_s"]
        out.append(row)
        print(f"  round at {n} hospitals: plaintext {row['plaintext_round_s']:.1f} s, masked "
              f"{row['secure_round_s']:.1f} s ({row['ratio']:.2f}x wall, {row['ratio_platform']:.2f}x by platform "
              f"time: +{extra:.2f} s); gas {row['gas']}", flush=True)
    return out


def dropout(base, settings: dict) -> dict:
    """Five hospitals, one drops after publishing its shares: the aggregate against the survivors' FedAvg."""
    lora = LoraSettings(r=4)
    trainer = LoraTrainer(base, lora)
    clients = build_clients(DataConfig(num_clients=5, train_per_client=24, eval_per_client=8))
    with tempfile.TemporaryDirectory() as tmp, plain_updates() as plain:
        rules = FederationRules(base_model=base.digest, lora=lora.to_json(), copy_threshold=0,
                                secure_aggregation=settings)
        fed = EmbeddedFederation.create([trainer] * 5, clients, rules, TrainSettings(steps=4, batch_size=4),
                                        EmbeddedStore(Path(tmp)))
        fed.start(trainer.initial_state(0))
        result, start, weights = dropout_round(fed, fed.nodes[:4])
    error = fedavg_error(result.state, start, [plain[n.address] for n in fed.nodes[:4]], weights)
    return {"hospitals": 5, "dropped": 1, "finalized": True, "accepted": sum(v.accepted for v in result.verdicts),
            "max_abs_error": error, "quantization_bound": SecureSettings(**settings).quantization_error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", default="3,10,30")
    ap.add_argument("--round-hospitals", default="3,10")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of each round (minimum kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "secagg.json")
    args = ap.parse_args()
    cache = Path(os.environ.get("FEDCHAIN_CACHE", Path.home() / ".cache" / "fedchain"))
    settings = SecureSettings(**SECURE)
    print("SmolLM2 local round (4 steps, batch 8) ...", flush=True)
    shapes, train_s = smollm2_round(cache)
    print(f"  {train_s:.1f} s; {sum(t.numel() for t in shapes.values()):,} LoRA parameters", flush=True)
    crypto_rows = []
    for n in (int(x) for x in args.hospitals.split(",")):
        row = crypto(shapes, n, settings)
        s = row["seconds"]
        row["hospital_overhead_fraction"] = (s["mask"] + s["reveal_all"]) / train_s
        row["aggregator_unmask_fraction"] = s["unmask_all"] / train_s
        crypto_rows.append(row)
        print(f"  {n} hospitals: mask {s['mask']:.2f} s, reveal {s['reveal_all']:.3f} s, "
              f"unmask {s['unmask_all']:.2f} s "
              f"({s['unmask_one_dropout']:.2f} s with a dropout); hospital overhead "
              f"{row['hospital_overhead_fraction']:.1%} of training, bytes x{row['bytes_ratio']:.2f}", flush=True)
    tiny = load_base_model("tiny", cache, corpus=lambda: corpus_texts(DataConfig(), 4000), seed=0)
    round_rows = rounds(tiny, [int(x) for x in args.round_hospitals.split(",")], SECURE, args.repeats)
    drop = dropout(tiny, SECURE)
    print(f"  dropout: {drop}", flush=True)
    result = {"settings": SECURE, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                              "torch": torch.__version__},
              "smollm2_local_round_s": train_s, "smollm2_lora_parameters": sum(t.numel() for t in shapes.values()),
              "crypto": crypto_rows, "rounds": round_rows, "dropout": drop,
              "numpy": np.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
