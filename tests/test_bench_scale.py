"""The scale benchmark's smallest run end to end (scripts/bench_scale.py at 2 hospitals on the embedded chain):
the round finalizes every submission, a fresh reader rebuilds the same history, the kernels run on identical
inputs and the JSON names every target with its measured value (no assertion on wall time)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smallest_run_writes_every_part_and_target(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "scripts/bench_scale.py", "--hospitals", "2", "--chains", "embedded",
                           "--repeats", "1", "--audit-rounds", "0", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["round"]["embedded"]
    assert row["hospitals"] == 2 and row["events"] >= 3 * 2 + 2  # joins, approvals, submissions, open, finalize
    assert row["receipt_lookup_s"]["indexed"] > 0
    (kernels,) = result["kernels"]["rows"]
    assert kernels["bytes_per_update"] == 3_686_400 and set(kernels["seconds"]) >= {"fedavg", "lora_exact"}
    assert result["kernels"]["verification"]["bytes"] > kernels["bytes_per_update"]
    assert {t["target"].split(":")[0] for t in result["targets"]} >= {"embedded", "verification / (sha256 + "
                                                                                   "safetensors load)"}
    assert "| embedded | 2 |" in proc.stdout
