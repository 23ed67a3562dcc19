"""`fedchain demo` end to end on the tiny model, through the real console command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from fednode.learning.data import DataConfig, corpus_texts
from fednode.learning.models import load_base_model
from fednode.storage import EmbeddedStore

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_the_global_adapter_beats_the_base_model(tmp_path, model_cache):
    out = tmp_path / "demo"
    env = {**os.environ, "FEDCHAIN_CACHE": str(model_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fednode", "demo", "--rounds", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 2" in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["mean_loss"] < report["round0"]["mean_loss"]
    # beside it, each hospital trained alone on the same steps: with 64 examples each, the worst hospital does
    # better federated, and the demo says so
    comparison = report["comparison"]
    assert [r["hospital"] for r in comparison["rows"]] == [c["name"] for c in report["clients"]]
    assert comparison["steps"] == 2 * 20 and comparison["lift"] > 0
    assert "what federation bought each hospital" in proc.stdout and "federation lowers the worst" in proc.stdout
    for r in rounds:
        assert [u["verdict"] for u in r["updates"]] == ["ACCEPTED"] * 3
        assert r["global"]["accepted"] == 3 and r["global"]["gas"] < 100_000
        assert all(u["gas"] < 60_000 and u["cid"].startswith("bafk") for u in r["updates"])
    # every update and global adapter is in the embedded store under its CID
    store = EmbeddedStore(out / "store")
    for r in rounds:
        for cid in [u["cid"] for u in r["updates"]] + [r["global"]["cid"]]:
            assert store.has(cid)
    # the exported global adapter loads with plain peft and changes the base model's output
    base = load_base_model("tiny", model_cache, corpus=lambda: corpus_texts(DataConfig(), 4000), seed=0)
    assert report["base_model"]["digest"] == base.digest
    ids = base.tokenizer("ICD-10-CM code E11.9 means:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base.model(ids).logits
        peft = PeftModel.from_pretrained(base.model, out / "adapters" / "round-2")
        after = peft(ids).logits
    assert not torch.allclose(before, after)
    # ... and names a base folder written beside it, so AutoPeftModelForCausalLM resolves it with no model hub
    config = json.loads((out / "adapters" / "round-2" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()
    assert (out / "adapters" / "round-2" / "tokenizer.json").is_file()


def test_demo_rejects_bad_arguments_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fednode", "demo", "--clients", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "clients" in proc.stderr
