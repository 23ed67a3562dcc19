"""The robustness benchmark's smoke run end to end (scripts/bench_robust.py --config smoke): a real attack degrades
FedAvg and not the median, a free rider is rejected under both, and the outputs are written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_every_rule_under_every_scenario(tmp_path, model_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_robust.py", "--config", "smoke", "--out", str(tmp_path),
                           "--cache-dir", str(model_cache)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "robust.json").read_text())
    assert report["complete"] and len(report["partitions"]) == 1
    runs = report["summary"]["icd10:natural"]["runs"]
    worst = {k: v["worst_loss_minus_clean_fedavg"]["mean"] for k, v in runs.items()}
    assert worst["fedavg/none/0"] == 0.0
    assert worst["fedavg/sign_flip/1"] > 1.0 > 0.2 > worst["median/sign_flip/1"]
    assert runs["fedavg/free_rider/1"]["rejected"] == runs["median/free_rider/1"]["rejected"] == [1]
    assert "| median |" in (tmp_path / "robust.md").read_text() and (tmp_path / "robust.png").stat().st_size > 0
