"""Full-parameter rounds (`adapter = "full"`): federated continued pre-training on the tiny model, and what one
SmolLM2-135M full-parameter round costs in time and memory. Prints and saves JSON.

    python scripts/bench_full.py [--part tiny,smollm2] [--seeds 0,1,2] [--out scripts/results/full.json]

1. tiny: method `pretrain` (every weight trains on every token of the hospital's text, FedAvg) through the embedded
   platform, per hospital its own held-out loss (all tokens) after every round against the base's and against the
   same hospital training alone for the same steps, then the whole history audited from chain and store;
2. smollm2: one round of two hospitals on SmolLM2-135M (every weight, float32: a 540 MB update each), time and
   peak resident memory (VmHWM, reset before each phase) of loading, training, publishing (packing, CID, store),
   the aggregator's verification and merge, and the audit's re-derivation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_quality import machine_info, parse_with_machine_args  # noqa: E402
from fednode.audit import run_audit  # noqa: E402
from fednode.learning.data import DataConfig, build_clients, corpus_texts  # noqa: E402
from fednode.learning.models import load_base_model  # noqa: E402
from fednode.learning.settings import LoraSettings, PromptSettings, TrainSettings  # noqa: E402
from fednode.ops.embedded import EmbeddedFederation, method_trainers  # noqa: E402
from fednode.protocol.methods import method  # noqa: E402
from fednode.storage import EmbeddedStore  # noqa: E402
from fednode.timing import Stopwatch  # noqa: E402

RESULTS = ROOT / "scripts" / "results"
TINY_SETTINGS = ("icd10", "drugs")
TINY = {"clients": 3, "train_per_client": 1024, "eval_per_client": 64, "rounds": 4, "steps": 20}
SMOLLM2 = {"clients": 2, "train_per_client": 64, "eval_per_client": 16, "steps": 4, "batch_size": 8}


def log(message: str) -> None:
    print(message, flush=True)


def memory(field: str) -> int:
    """A field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak since the last `reset_peak`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def federation(base, spec, clients, train: TrainSettings, store_dir: Path, watch: Stopwatch, **overrides):
    trainer, trainers = method_trainers(base, spec, LoraSettings(), PromptSettings(), len(clients))
    rules = spec.rules(base.digest, LoraSettings(), PromptSettings(), train, **overrides)
    fed = EmbeddedFederation.create(trainers, clients, rules, train, EmbeddedStore(store_dir), watch)
    return trainer, fed


def tiny_scenario(source: str, seed: int, cache_dir: Path) -> dict:
    """One source and seed: the federated run round by round, the local-only baseline, the audit."""
    spec = method("pretrain")
    data = DataConfig(source=source, partition="natural", num_clients=TINY["clients"],
                      train_per_client=TINY["train_per_client"], eval_per_client=TINY["eval_per_client"], seed=seed)
    clients = build_clients(data)
    base = load_base_model("tiny", cache_dir, corpus=lambda: corpus_texts(data, 4000), seed=seed)
    train = spec.train_settings(TrainSettings(steps=TINY["steps"], seed=seed))
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="fedchain-full-") as tmp:
        trainer, fed = federation(base, spec, clients, train, Path(tmp), watch, rounds=TINY["rounds"])
        initial = trainer.initial_state(seed)
        fed.start(initial)

        def losses(states: dict) -> dict:
            return {c.name: trainer.evaluate(c.eval, states[c.name])["loss"] for c in clients}

        curve = [losses({c.name: initial for c in clients})]
        rounds = []
        for r in range(1, TINY["rounds"] + 1):
            started = time.perf_counter()
            run = fed.run_round(min_updates=len(clients))
            rounds.append({"round": r, "seconds": time.perf_counter() - started, "accepted": len(run.result.accepted),
                           "bytes_up": [u.size for u in run.updates], "bytes_down": run.result.size})
            curve.append(losses({c.name: run.result.state for c in clients}))
        started = time.perf_counter()
        audit = run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True)
        audit_seconds = time.perf_counter() - started
    local = {c.name: initial for c in clients}
    for r in range(1, TINY["rounds"] + 1):
        for c in clients:
            local[c.name], _ = trainer.train(c.train, replace(train, seed=train.seed + r), local[c.name],
                                             progress=False)
    alone = losses(local)
    final = curve[-1]
    cross_alone = {c.name: sum(trainer.evaluate(o.eval, local[c.name])["loss"] for o in clients if o is not c)
                   / (len(clients) - 1) for c in clients}
    cross_federated = {n: sum(v for m, v in final.items() if m != n) / (len(final) - 1) for n in final}
    return {"source": source, "seed": seed, "clients": [c.name for c in clients], "curve": curve, "rounds": rounds,
            "local_only": alone, "cross": {"federated": cross_federated, "local_only": cross_alone},
            "audit": audit.summary(), "audit_seconds": audit_seconds,
            "falls_for_every_hospital": all(final[n] < curve[0][n] for n in final),
            "federated_minus_local": {n: final[n] - alone[n] for n in final},
            "worst": {"federated": max(final.values()), "local_only": max(alone.values()),
                      "base": max(curve[0].values())}}


def smollm2_round(cache_dir: Path) -> dict:
    """One full-parameter round of SmolLM2 with two hospitals, phase by phase: seconds and peak RSS."""
    spec = method("pretrain")
    phases: dict[str, dict] = {}

    def phase(name: str, fn):
        reset_peak()
        before, started = memory("VmRSS"), time.perf_counter()
        value = fn()
        peak = memory("VmHWM")
        phases[name] = {"seconds": time.perf_counter() - started, "rss_before": before, "peak_rss": peak}
        log(f"  {name}: {phases[name]['seconds']:.1f} s, RSS {before / 2**30:.2f} -> peak {peak / 2**30:.2f} GiB")
        return value

    data = DataConfig(source="drugs", partition="natural", num_clients=SMOLLM2["clients"],
                      train_per_client=SMOLLM2["train_per_client"], eval_per_client=SMOLLM2["eval_per_client"])
    clients = build_clients(data)
    base = phase("load base", lambda: load_base_model("smollm2", cache_dir))
    params = sum(p.numel() for p in base.model.parameters())
    train = spec.train_settings(TrainSettings(steps=SMOLLM2["steps"], batch_size=SMOLLM2["batch_size"]))
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="fedchain-full-smollm2-") as tmp:
        trainer, fed = phase("build trainer + federation", lambda: federation(
            base, spec, clients, train, Path(tmp), watch, max_adapter_bytes=2**31, max_update_norm=1e3))
        initial = phase("publish initial model", lambda: _start(fed, trainer))
        rec = fed.open(min_updates=len(clients))
        updates = [phase(f"{n.client.name}: train + publish", lambda n=n: n.participate(rec)) for n in fed.nodes]
        before = dict(watch.seconds)
        result = phase("aggregator: verify + merge + finalize", lambda: fed.finalize(rec))
        by_kind = {k: v - before.get(k, 0.0) for k, v in watch.seconds.items() if v - before.get(k, 0.0) > 0}
        base_loss = phase("evaluate base", partial(held_out, trainer, clients, initial))
        loss = phase("evaluate global", partial(held_out, trainer, clients, result.state))
        del initial, result  # the audit's peak without the bench's own copies
        audit = phase("audit --verify", lambda: run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True))
    for p in phases.values():  # what the phase held at its peak beyond what was resident when it began
        p["peak_over_start_in_model_copies"] = (p["peak_rss"] - p["rss_before"]) / (params * 4)
    return {"parameters": params, "model_bytes_float32": params * 4, "update_bytes": [u.size for u in updates],
            "train": asdict(train), "clients": SMOLLM2["clients"], "phases": phases,
            "aggregator_seconds_by_kind": by_kind, "train_loss": [u.metrics["train_loss"] for u in updates],
            "eval_loss": {"base": base_loss, "global": loss}, "audit": audit.summary(),
            "peak_rss": max(p["peak_rss"] for p in phases.values())}


def held_out(trainer, clients, state) -> list[float]:
    return [trainer.evaluate(c.eval, state)["loss"] for c in clients]


def _start(fed: EmbeddedFederation, trainer) -> dict:
    initial = trainer.initial_state(0)
    fed.start(initial)
    return initial


def tiny_summary(scenarios: list[dict]) -> dict:
    out = {}
    for source in dict.fromkeys(s["source"] for s in scenarios):
        runs = [s for s in scenarios if s["source"] == source]
        out[source] = {
            "seeds": [s["seed"] for s in runs],
            "falls_for_every_hospital": [s["falls_for_every_hospital"] for s in runs],
            "worst_base": [s["worst"]["base"] for s in runs],
            "worst_federated": [s["worst"]["federated"] for s in runs],
            "worst_local_only": [s["worst"]["local_only"] for s in runs],
            "mean_cross_federated": [_mean(s["cross"]["federated"]) for s in runs],
            "mean_cross_local_only": [_mean(s["cross"]["local_only"]) for s in runs],
            "largest_rise": max(s["curve"][-1][n] - s["curve"][0][n] for s in runs for n in s["curve"][0]),
            "audits": [s["audit"] for s in runs]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="tiny,smollm2", help="comma-separated parts: tiny, smollm2")
    p.add_argument("--seeds", default="0,1,2", help="tiny part: comma-separated seeds")
    p.add_argument("--out", type=Path, default=RESULTS / "full.json")
    args = parse_with_machine_args(p, argv)
    parts = args.part.split(",")
    if set(parts) - {"tiny", "smollm2"} or not parts:
        print(f"bench_full: --part takes tiny and/or smollm2, got {args.part!r}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"bench_full: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["machine"] = machine_info(args.threads)
    if "tiny" in parts:
        scenarios = []
        for source in TINY_SETTINGS:
            for seed in seeds:
                log(f"tiny {source} seed {seed}")
                scenarios.append(tiny_scenario(source, seed, args.cache_dir))
                s = scenarios[-1]
                log(f"  own held-out loss per hospital: base {_fmt(s['curve'][0])} -> federated {_fmt(s['curve'][-1])}"
                    f", local only {_fmt(s['local_only'])}; others' splits: federated {_fmt(s['cross']['federated'])}"
                    f", local only {_fmt(s['cross']['local_only'])}; {s['audit']}")
        report["tiny"] = {"config": TINY, "method": asdict(method("pretrain")), "scenarios": scenarios,
                          "summary": tiny_summary(scenarios)}
    if "smollm2" in parts:
        log("smollm2: one full-parameter round")
        report["smollm2"] = {"config": SMOLLM2, **smollm2_round(args.cache_dir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log(f"wrote {args.out}")
    return 0


def _mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def _fmt(losses: dict) -> str:
    return "/".join(f"{v:.3f}" for v in losses.values())


if __name__ == "__main__":
    sys.exit(main())
