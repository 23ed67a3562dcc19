"""The quality benchmark: the tiny smoke grid end to end through scripts/bench_quality.py, the multiple-choice
scoring against the trainer's own loss, and one-line errors for bad grids."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from fednode.benchmark import METHODS, BenchConfig, BenchmarkError, Choice, Scenario, multiple_choice_accuracy
from fednode.data import DataConfig, build_clients, multiple_choice_items
from fednode.settings import LoraSettings
from fednode.training import LoraTrainer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_quality.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _numbers(value):
    """Every number anywhere inside a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, decompressed image data) of a PNG, checking its chunk structure and CRCs."""
    assert data.startswith(PNG_SIGNATURE)
    pos, chunks = len(PNG_SIGNATURE), []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    return width, height, zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_cache) -> Path:
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "FEDCHAIN_CACHE": str(model_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out


def test_smoke_run_scores_all_three_methods_per_hospital_own_and_cross(smoke):
    report = json.loads((smoke / "quality.json").read_text())
    cfg = report["config"]
    assert report["complete"] and cfg["preset"] == "tiny" and report["machine"]["torch"]
    assert all(math.isfinite(x) for x in _numbers(report))
    (scenario,) = report["scenarios"]
    names = [c["name"] for c in scenario["clients"]]
    assert len(names) == cfg["clients"] and set(scenario["methods"]) == set(METHODS)
    for method, result in scenario["methods"].items():
        assert set(result["hospitals"]) == set(names)
        assert [r["round"] for r in result["rounds"]] == list(range(cfg["rounds"] + 1))
        for name, h in result["hospitals"].items():
            assert set(h["cross"]) == set(names) - {name}
            for m in [h["own"], *h["cross"].values(), *h["curve"]]:
                assert 0.0 <= m["mc_acc"] <= 1.0 and 0.0 <= m["mc_acc_total"] <= 1.0 and m["loss"] > 0
                assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
            # round 0 is the same initial adapter for every method
            assert h["curve"][0] == scenario["methods"]["local"]["hospitals"][name]["curve"][0]
        final = result["final"]
        assert final["worst_loss"] == max(h["own"]["loss"] for h in result["hospitals"].values())
        assert final["worst_acc"] == min(h["own"]["mc_acc"] for h in result["hospitals"].values())
        assert final["loss_gap"] >= 0 and final["acc_gap"] >= 0
    # federated and centralized have one model: its cross scores are the other hospitals' own scores
    for method in ("federated", "centralized"):
        hospitals = scenario["methods"][method]["hospitals"]
        for name, h in hospitals.items():
            assert all(m == hospitals[other]["own"] for other, m in h["cross"].items())
    local = scenario["methods"]["local"]["hospitals"]
    assert local[names[0]]["cross"][names[1]] != local[names[1]]["own"]  # local models are distinct


def test_smoke_run_keeps_the_step_budget_and_trains_centralized_on_the_union(smoke):
    report = json.loads((smoke / "quality.json").read_text())
    cfg, (scenario,) = report["config"], report["scenarios"]
    steps, clients = cfg["train"]["steps"], cfg["clients"]
    union = sum(c["train"] for c in scenario["clients"])
    central = scenario["methods"]["centralized"]["training"]
    assert central["samples"] == union
    for r in central["rounds"]:
        assert r["models"]["global"]["steps"] == steps * clients and r["models"]["global"]["samples"] == union
    for method in ("local", "federated"):
        for r in scenario["methods"][method]["training"]["rounds"]:
            assert {m["steps"] for m in r["models"].values()} == {steps}
    fed_rounds = scenario["methods"]["federated"]["training"]["rounds"]
    assert [r["chain_round"] for r in fed_rounds] == list(range(1, cfg["rounds"] + 1))
    for r in fed_rounds:
        assert r["verdicts"] == ["ACCEPTED"] * clients and r["accepted"] == clients
        assert r["seconds"]["training"] > 0 and r["seconds"]["chain"] > 0 and r["seconds"]["storage"] > 0
        assert 0 < r["platform_fraction"] < 1 and r["seconds"]["platform"] < r["seconds"]["wall"]
    summary = report["summary"]["icd10:natural"]
    worst = {m: scenario["methods"][m]["final"]["worst_loss"] for m in METHODS}
    assert summary["federated_minus_local"]["worst_loss"]["mean"] == pytest.approx(worst["federated"] - worst["local"])


def test_smoke_run_writes_a_table_and_a_plot(smoke):
    table = (smoke / "quality.md").read_text()
    assert "| setting | method | mean loss | worst loss | loss gap |" in table
    for method in METHODS:
        assert f"| icd10:natural | {method} |" in table
    width, height, pixels = _png_pixels((smoke / "quality.png").read_bytes())
    assert width >= 400 and height >= 300
    assert len(set(pixels)) > 16  # lines, bars and text, not a blank canvas


def test_multiple_choice_scores_are_the_evaluation_loss_per_option(icd_base):
    trainer = LoraTrainer(icd_base, LoraSettings())
    state = trainer.initial_state(1)
    client = build_clients(DataConfig())[0]
    questions = multiple_choice_items(client)[:6]
    options = [Choice(prompt, option) for prompt, opts, _ in questions for option in opts]
    scores = trainer.score(options, state)
    assert len(scores) == len(options) and all(ll < 0 < n for ll, n in scores)
    loss = trainer.evaluate(options, state)
    assert sum(n for _, n in scores) == loss["tokens"]
    assert -sum(ll for ll, _ in scores) / loss["tokens"] == pytest.approx(loss["loss"], rel=1e-5)
    acc = multiple_choice_accuracy(trainer, state, questions)
    assert acc["mc_items"] == 6 and acc == multiple_choice_accuracy(trainer, state, questions)
    assert acc["mc_acc"] in {k / 6 for k in range(7)}


@pytest.mark.parametrize("spec, words", [("icd10:dirichlet", "alpha"), ("icd10:natural:0.5", "alpha"),
                                         ("xray:natural", "source"), ("drugs:dirichlet:abc", "alpha")])
def test_bad_settings_are_rejected_by_name(spec, words):
    with pytest.raises(BenchmarkError, match=words):
        Scenario.parse(spec, 0)


def test_bad_grids_are_rejected():
    with pytest.raises(BenchmarkError, match="seeds"):
        BenchConfig(seeds=())
    with pytest.raises(BenchmarkError, match="repeat"):
        BenchConfig(seeds=(0, 0))
    with pytest.raises(BenchmarkError, match="model"):
        BenchConfig(model="gpt")
    with pytest.raises(ValueError, match="alpha"):
        Scenario("icd10", "dirichlet", alpha=0.0)


def test_the_script_rejects_a_bad_grid_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--settings", "icd10:dirichlet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alpha" in err
    assert not list(tmp_path.iterdir())
