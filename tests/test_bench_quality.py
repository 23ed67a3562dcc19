"""The quality benchmark: the tiny smoke grid with several federated methods end to end through
scripts/bench_quality.py, the multiple-choice scoring against the trainer's own loss, and one-line errors for bad
grids."""
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

from fednode.learning.adapters import make_trainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.privacy import DPSettings, epsilon
from fednode.learning.settings import ClientObjective, LoraSettings
from research.multiple_choice import multiple_choice_items
from research.quality import BenchConfig, Scenario
from research.scoring import BenchmarkError, Choice, Model, multiple_choice_accuracy

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


SMOKE_METHODS = ("fedavg", "ffa", "lora_exact", "hetero_ranks", "personalized", "prompt", "dp-1")
SHARED_MODEL = ("fedavg", "ffa", "lora_exact", "prompt", "dp-1", "centralized")  # one model for every hospital
OWN_MODELS = ("local", "hetero_ranks", "personalized")  # a model per hospital


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_cache) -> Path:
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "FEDCHAIN_CACHE": str(model_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--methods", ",".join(SMOKE_METHODS),
                           "--out", str(out), "--threads", "1"],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out


@pytest.fixture(scope="module")
def report(smoke) -> dict:
    return json.loads((smoke / "quality.json").read_text())


def test_smoke_run_scores_every_method_per_hospital_own_and_cross(report):
    cfg = report["config"]
    assert report["complete"] and cfg["preset"] == "tiny" and report["machine"]["torch"]
    assert cfg["methods"] == list(SMOKE_METHODS) and set(cfg["federated_methods"]) == set(SMOKE_METHODS)
    assert all(math.isfinite(x) for x in _numbers(report))
    (scenario,) = report["scenarios"]
    names = [c["name"] for c in scenario["clients"]]
    methods = scenario["methods"]
    assert set(methods) == {"local", *SMOKE_METHODS, "centralized"}
    assert {m: r["kind"] for m, r in methods.items()} == {"local": "local", "centralized": "centralized",
                                                         **{m: "federated" for m in SMOKE_METHODS}}
    for method, result in methods.items():
        assert set(result["hospitals"]) == set(names)
        assert [r["round"] for r in result["rounds"]] == list(range(cfg["rounds"] + 1))
        for name, h in result["hospitals"].items():
            assert set(h["cross"]) == set(names) - {name}
            for m in [h["own"], *h["cross"].values(), *h["curve"]]:
                assert 0.0 <= m["mc_acc"] <= 1.0 and 0.0 <= m["mc_acc_total"] <= 1.0 and m["loss"] > 0
                assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
            assert h["curve"][-1] == {"round": cfg["rounds"], **h["own"]}
        final = result["final"]
        assert final["worst_loss"] == max(h["own"]["loss"] for h in result["hospitals"].values())
        assert final["worst_acc"] == min(h["own"]["mc_acc"] for h in result["hospitals"].values())
        assert final["loss_gap"] >= 0 and final["acc_gap"] >= 0
    local = methods["local"]["hospitals"]
    for name in names:
        start = local[name]["curve"][0]
        # every method starts from the same adapter seed; LoRA's B = 0, so every LoRA model starts as the base
        assert methods["centralized"]["hospitals"][name]["curve"][0] == start
        assert methods["fedavg"]["hospitals"][name]["curve"][0] == start
        for method in ("ffa", "lora_exact", "hetero_ranks", "personalized", "dp-1"):
            assert methods[method]["hospitals"][name]["curve"][0]["loss"] == pytest.approx(start["loss"], rel=1e-5)
        # the prompt model's random virtual tokens already move the loss: it is scored with the prompt trainer
        assert abs(methods["prompt"]["hospitals"][name]["curve"][0]["loss"] - start["loss"]) > 1e-4
    for method in SHARED_MODEL:  # one model: its cross scores are the other hospitals' own scores
        hospitals = methods[method]["hospitals"]
        for name, h in hospitals.items():
            assert all(m == hospitals[other]["own"] for other, m in h["cross"].items())
    for method in OWN_MODELS:  # each hospital's own model: rank-cut, private adapter or trained alone
        hospitals = methods[method]["hospitals"]
        for name, h in hospitals.items():
            assert all(m["loss"] != hospitals[other]["own"]["loss"] for other, m in h["cross"].items()), method


def test_every_federated_round_merges_every_update_within_the_step_budget(report):
    cfg, (scenario,) = report["config"], report["scenarios"]
    steps, clients = cfg["train"]["steps"], cfg["clients"]
    union = sum(c["train"] for c in scenario["clients"])
    central = scenario["methods"]["centralized"]["training"]
    assert central["samples"] == union
    for r in central["rounds"]:
        assert r["models"]["global"]["steps"] == steps * clients and r["models"]["global"]["samples"] == union
    for method in ("local", *SMOKE_METHODS):
        for r in scenario["methods"][method]["training"]["rounds"]:
            assert len(r["models"]) == clients and {m["steps"] for m in r["models"].values()} == {steps}
    for method in SMOKE_METHODS:
        rounds = scenario["methods"][method]["training"]["rounds"]
        assert [r["chain_round"] for r in rounds] == list(range(1, cfg["rounds"] + 1))
        for r in rounds:
            assert r["verdicts"] == ["ACCEPTED"] * clients and r["accepted"] == clients, method
            assert len(r["update_norms"]) == clients and all(n > 0 for n in r["update_norms"])
            assert r["seconds"]["training"] > 0 and r["seconds"]["chain"] > 0 and r["seconds"]["storage"] > 0
            assert 0 < r["platform_fraction"] < 1 and r["seconds"]["platform"] < r["seconds"]["wall"]
    for r in scenario["methods"]["personalized"]["training"]["rounds"]:
        assert all(m["orthogonality"] >= 0 and m["personal_eval_loss"] > 0 for m in r["models"].values())
    summary = report["summary"]["icd10:natural"]["methods"]
    worst = {m: scenario["methods"][m]["final"]["worst_loss"] for m in scenario["methods"]}
    for method in SMOKE_METHODS:
        assert summary[method]["minus_local"]["worst_loss"]["mean"] == pytest.approx(worst[method] - worst["local"])
        assert summary[method]["minus_centralized"]["worst_loss"]["mean"] == pytest.approx(
            worst[method] - worst["centralized"])
    assert all("minus_local" not in summary[m] for m in ("local", "centralized"))


def test_dp_rounds_carry_the_nodes_epsilon_and_the_accountants(report):
    cfg, (scenario,) = report["config"], report["scenarios"]
    dp = cfg["federated_methods"]["dp-1"]["privacy"]
    expected = [epsilon(DPSettings(**dp), r) for r in range(1, cfg["rounds"] + 1)]
    training = scenario["methods"]["dp-1"]["training"]
    for r, eps in zip(training["rounds"], expected):
        assert [p["epsilon"] for p in r["privacy"]] == [pytest.approx(eps)] * cfg["clients"]
        assert all(p["pre_clip_norm"] > 0 for p in r["privacy"])
    assert training["privacy"]["epsilon"] == pytest.approx(expected[-1]) and expected[0] < expected[-1]
    assert training["privacy"]["noise_multiplier"] == 1.0
    summary = report["summary"]["icd10:natural"]["methods"]
    assert summary["dp-1"]["epsilon"]["mean"] == pytest.approx(expected[-1])
    for method in scenario["methods"]:
        if method != "dp-1":
            assert "privacy" not in scenario["methods"][method]["training"] and "epsilon" not in summary[method]


def test_aggregation_error_is_measured_on_each_rounds_accepted_updates(report):
    (scenario,) = report["scenarios"]

    def errors(method: str) -> list[dict]:
        return [r["aggregation_error"] for r in scenario["methods"][method]["training"]["rounds"]]

    ffa = errors("ffa")  # A frozen at the shared init: averaging B is averaging the products, exactly
    assert all(e["fedavg"] < 1e-9 and e["exact"] < 1e-9 for e in ffa)
    for method in ("fedavg", "lora_exact", "personalized", "dp-1"):  # A and B trained: their means are not exact
        assert all(e["fedavg"] > 1e-6 and e["fedavg"] > 1e3 * max(f["fedavg"] for f in ffa) for e in errors(method))
        assert all(0 < e["exact"] < 1 for e in errors(method))
    hetero = errors("hetero_ranks")  # ranks 8, 4, 2: no plain FedAvg of the factors, only the exact merge
    assert all("fedavg" not in e and 0 < e["exact"] < 1 for e in hetero)
    assert all(set(m) <= {"fedavg", "exact"} for e in hetero + ffa for m in e["modules"].values())
    assert "aggregation_error" not in scenario["methods"]["prompt"]["training"]["rounds"][0]
    summary = report["summary"]["icd10:natural"]["methods"]
    assert summary["fedavg"]["aggregation_error"]["fedavg"]["mean"] == pytest.approx(
        sum(e["fedavg"] for e in errors("fedavg")) / len(errors("fedavg")))
    assert set(summary["hetero_ranks"]["aggregation_error"]) == {"exact"}
    assert "aggregation_error" not in summary["prompt"] and "aggregation_error" not in summary["local"]


def test_smoke_run_writes_a_table_and_a_plot(smoke, report):
    table = (smoke / "quality.md").read_text()
    assert "| setting | method | mean loss | worst loss | loss gap | cross loss | mean acc | worst acc | epsilon |" \
        in table
    methods_table = table.split("| setting | method | worst loss: - local")[0]
    rows = {line.split(" | ")[1]: line for line in methods_table.splitlines() if line.startswith("| icd10:natural | ")}
    assert len(rows) == 2 + len(SMOKE_METHODS)
    for method in ("local", *SMOKE_METHODS, "centralized"):
        assert f"| icd10:natural | {method} |" in table
    epsilon_cell = f"{report['summary']['icd10:natural']['methods']['dp-1']['epsilon']['mean']:.3g}"
    assert f" | {epsilon_cell} | " in rows["dp-1"] and " | – / " in rows["hetero_ranks"]
    assert table.count("| icd10:natural | ") == 2 + 2 * len(SMOKE_METHODS)  # the method table + the differences
    width, height, pixels = _png_pixels((smoke / "quality.png").read_bytes())
    assert width >= 400 and height >= 300
    assert len(set(pixels)) > 16  # lines, bars and text, not a blank canvas


def test_multiple_choice_scores_are_the_evaluation_loss_per_option(icd_base):
    trainer = make_trainer(icd_base, "lora", LoraSettings().to_json(), ClientObjective())
    state = trainer.initial_state(1)
    client = build_clients(DataConfig())[0]
    questions = multiple_choice_items(client)[:6]
    options = [Choice(prompt, option) for prompt, opts, _ in questions for option in opts]
    scores = trainer.score(options, state)
    assert len(scores) == len(options) and all(ll < 0 < n for ll, n in scores)
    loss = trainer.evaluate(options, state)
    assert sum(n for _, n in scores) == loss["tokens"]
    assert -sum(ll for ll, _ in scores) / loss["tokens"] == pytest.approx(loss["loss"], rel=1e-5)
    acc = multiple_choice_accuracy(Model(trainer, state), questions)
    assert acc["mc_items"] == 6 and acc == multiple_choice_accuracy(Model(trainer, state), questions)
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
    with pytest.raises(BenchmarkError, match="unknown federated method 'fedsgd'"):
        BenchConfig(methods=("fedavg", "fedsgd"))
    with pytest.raises(BenchmarkError, match="methods must not repeat"):
        BenchConfig(methods=("dp-1", "dp-1"))
    with pytest.raises(BenchmarkError, match="methods must name at least one"):
        BenchConfig(methods=())
    with pytest.raises(ValueError, match="alpha"):
        Scenario("icd10", "dirichlet", alpha=0.0)


def test_the_script_rejects_a_bad_grid_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for args, words in ((["--settings", "icd10:dirichlet"], "alpha"), (["--methods", "fedavg,fedsgd"], "fedsgd")):
        assert module.main([*args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err
        assert not list(tmp_path.iterdir())
