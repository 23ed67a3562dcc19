"""LoRA aggregation error on real updates: plain FedAvg (A and B averaged separately) vs exact aggregation.

    python scripts/bench_aggregation.py [--model tiny|smollm2] [--clients 3] [--steps 10] [--ranks 8,8,8]

Each hospital trains its LoRA update from the same start adapter on its own ICD-10 chapters (natural non-IID
split). On those real updates it measures, against D = the sample-weighted mean of the products scale_i B_i A_i
(what the merged adapter should add to every weight matrix):
  fedavg: ||scale mean(B) mean(A) - D||_F / ||D||_F   (equal ranks only)
  exact:  ||refactor_r(D) - D||_F / ||D||_F           (lora_exact: D re-factored to rank r by SVD)
plus each merged adapter's held-out loss per hospital and the wall time of each aggregation (lora_exact also by a
full SVD of each dense mean, against which its QR-core merge is checked). Writes
scripts/results/aggregation-<model>.json and prints a table; both aggregations side by side in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="local optimizer steps per hospital")
    p.add_argument("--ranks", default="", help="comma-separated LoRA rank per hospital (default: all 8); the global "
                                               "rank is the largest")
    p.add_argument("--train-per-client", type=int, default=128)
    p.add_argument("--eval-per-client", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "FEDCHAIN_CACHE", Path.home() / ".cache" / "fedchain")))
    args = p.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [8] * args.clients
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if len(args.ranks) != args.clients or min(args.ranks) < 1 or args.clients < 1 or args.steps < 1:
        p.error("--ranks needs one positive rank per hospital; --clients and --steps must be >= 1")
    return args


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def run(args) -> dict:
    import torch

    from fednode.learning.adapters import LoraTrainer
    from fednode.learning.data import DataConfig, build_clients, corpus_texts
    from fednode.learning.lora_math import aggregation_error, products, refactor, truncate, weighted_mean
    from fednode.learning.models import load_base_model
    from fednode.learning.settings import LoraSettings, TrainSettings
    from fednode.strategies.base import WeightedUpdate
    from fednode.strategies.fedavg import FedAvg
    from fednode.strategies.lora_exact import LoraExact

    torch.set_num_threads(args.threads)
    data = DataConfig(num_clients=args.clients, train_per_client=args.train_per_client,
                      eval_per_client=args.eval_per_client, seed=args.seed)
    clients = build_clients(data)
    base = load_base_model(args.model, args.cache_dir, corpus=lambda: corpus_texts(data, 4000), seed=args.seed)
    lora = LoraSettings(r=max(args.ranks))
    global_config = lora.to_json()
    trainers = {r: LoraTrainer(base, replace(lora, r=r)) for r in sorted(set(args.ranks))}
    start = trainers[lora.r].initial_state(args.seed)
    train = TrainSettings(steps=args.steps, seed=args.seed)

    updates, seconds = [], {"training": 0.0}
    for client, r in zip(clients, args.ranks):
        trainer = trainers[r]
        config = trainer.lora.to_json()
        (state, metrics), took = timed(trainer.train, client.train, train, truncate(start, global_config, config),
                                       False)
        seconds["training"] += took
        updates.append(WeightedUpdate(len(updates), len(client.train), state, config))
        print(f"{client.name}: rank {r}, train loss {metrics['train_loss']:.4f} ({took:.1f} s)", flush=True)

    weights = [u.num_samples for u in updates]
    error, seconds["measure"] = timed(aggregation_error, [(u.state, u.adapter_config) for u in updates], weights,
                                      global_config)
    merged = {}
    equal = len(set(args.ranks)) == 1
    for strategy in ([FedAvg(adapter_config=global_config)] if equal else []) + [LoraExact(
            adapter_config=global_config)]:
        merged[strategy.name], seconds[f"aggregate_{strategy.name}"] = timed(strategy.aggregate_train, start, updates)
    exact = strategy

    def dense_svd():  # the same merge by a full SVD of each module's dense mean (what refactor_sum avoids)
        every = [products(u.state, u.adapter_config) for u in updates]
        normalised = [w / sum(weights) for w in weights]
        return refactor({p: weighted_mean([e[p] for e in every], normalised) for p in every[0]}, global_config)[0]

    dense, seconds["aggregate_lora_exact_dense_svd"] = timed(dense_svd)
    _, factored_vs_dense = exact.equivalent(merged["lora_exact"], dense)
    losses = {name: {c.name: trainers[lora.r].evaluate(c.eval, state)["loss"] for c in clients}
              for name, state in merged.items()}
    worst = {name: max(v.values()) for name, v in losses.items()}
    modules = error.pop("modules")
    return {
        "model": base.name, "clients": [c.name for c in clients], "ranks": args.ranks, "steps": args.steps,
        "weights": weights, "error": error,
        "error_by_module_kind": {kind: {k: statistics.fmean(m[k] for p, m in modules.items() if p.endswith(kind))
                                        for k in modules[next(iter(modules))]}
                                 for kind in sorted({p.rsplit(".", 1)[-1] for p in modules})},
        "modules": len(modules), "eval_loss": losses, "worst_eval_loss": worst,
        "mean_eval_loss": {name: statistics.fmean(v.values()) for name, v in losses.items()},
        "seconds": seconds, "lora_exact_qr_vs_dense_svd": factored_vs_dense,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads},
    }


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    result = run(args)
    out = args.out or RESULTS / f"aggregation-{args.model}{'-hetero' if len(set(args.ranks)) > 1 else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    e = result["error"]
    print(f"\n{result['model']}, ranks {result['ranks']}, {result['steps']} steps, {result['modules']} modules")
    print(f"{'aggregation':<12} {'rel. error vs mean of products':>31} {'mean eval loss':>15} {'worst':>8} "
          f"{'seconds':>8}")
    for name in result["eval_loss"]:
        err = e.get("fedavg") if name == "fedavg" else e["exact"]
        print(f"{name:<12} {err:>31.3e} {result['mean_eval_loss'][name]:>15.4f} "
              f"{result['worst_eval_loss'][name]:>8.4f} {result['seconds'][f'aggregate_{name}']:>8.3f}")
    print(f"lora_exact by a dense SVD per module: {result['seconds']['aggregate_lora_exact_dense_svd']:.3f} s; "
          f"largest relative product difference from the QR merge {result['lora_exact_qr_vs_dense_svd']:.1e}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
