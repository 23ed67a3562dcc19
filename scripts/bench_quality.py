"""Non-IID medical benchmark: federated (full platform path) vs local-only vs centralized, worst hospital in view.

    python scripts/bench_quality.py [--config tiny|tiny-full|smollm2] [--out DIR] [--seeds 0,1] [--rounds 3] ...

Writes DIR/quality.json (every number, the exact config, machine info), DIR/quality.md (methods x {mean loss,
worst loss, gap, mean acc, worst acc}) and DIR/quality.png (per-hospital curves per method, worst-hospital bars,
federated round time by kind). All three are rewritten after every scenario, so a long run shows its progress;
"complete" in the JSON turns true at the end. See fednode/benchmark.py for what each method does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CURVE_KINDS = ("training", "evaluation", "storage", "chain", "verification", "aggregation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from fednode.benchmark import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="tiny", help="preset grid (default: tiny smoke run)")
    p.add_argument("--out", type=Path, help="output folder (default scripts/results/quality-<config>)")
    p.add_argument("--settings", help="comma-separated source:partition[:alpha], e.g. icd10:natural,drugs:dirichlet:1")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps per hospital per round")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--clients", type=int)
    p.add_argument("--train-per-client", type=int)
    p.add_argument("--eval-per-client", type=int)
    p.add_argument("--mc-items", type=int, help="multiple-choice questions per hospital")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on a busy 2-core box)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDCHAIN_CACHE", Path.home() / ".cache"
                                                                       / "fedchain")))
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    return args


def build_config(args: argparse.Namespace):
    from fednode.benchmark import PRESETS

    cfg = PRESETS[args.config]
    train = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
             if v is not None}
    fields = {k: getattr(args, k) for k in ("rounds", "clients", "train_per_client", "eval_per_client", "mc_items")
              if getattr(args, k) is not None}
    if args.settings:
        fields["settings"] = tuple(s.strip() for s in args.settings.split(","))
    if args.seeds:
        try:
            fields["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers; got {args.seeds!r}") from None
    return replace(cfg, train=replace(cfg.train, **train), **fields)


def machine_info(threads: int) -> dict:
    import peft
    import torch
    import transformers

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "transformers": transformers.__version__, "peft": peft.__version__}


def plot(report: dict, path: Path) -> None:
    """Per-hospital own-split loss curves per method (first seed of each setting), worst-hospital final loss and
    accuracy per setting and method (mean over seeds, sd as error bars), federated round time by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fednode.benchmark import METHODS

    summary = report["summary"]
    settings = list(summary)
    firsts = [next(s for s in report["scenarios"] if s["setting"] == setting) for setting in settings]
    fig, axes = plt.subplots(len(firsts) + 1, 3, figsize=(13, 3.2 * (len(firsts) + 1)), squeeze=False)
    for row, scenario in zip(axes, firsts):
        for ax, method in zip(row, METHODS):
            for hospital, h in scenario["methods"][method]["hospitals"].items():
                ax.plot([p["round"] for p in h["curve"]], [p["loss"] for p in h["curve"]], marker="o", label=hospital)
            ax.set_title(f"{scenario['name']}: {method}", fontsize=9)
            ax.set_xticks([p["round"] for p in h["curve"]])
            ax.set_xlabel("round")
            ax.set_ylabel("own held-out loss")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
        lows, highs = zip(*(ax.get_ylim() for ax in row))
        for ax in row:
            ax.set_ylim(min(lows), max(highs))
    bars = axes[-1]
    width = 0.8 / len(METHODS)
    xs = range(len(settings))
    for ax, metric, label in ((bars[0], "worst_loss", "worst-hospital loss (lower is better)"),
                              (bars[1], "worst_acc", "worst-hospital MC accuracy")):
        for i, method in enumerate(METHODS):
            stats = [summary[s]["methods"][method][metric] for s in settings]
            ax.bar([x + (i - (len(METHODS) - 1) / 2) * width for x in xs], [v["mean"] for v in stats], width,
                   yerr=[v["sd"] for v in stats], label=method, capsize=2)
        ax.set_xticks(list(xs), settings, rotation=30, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    losses = [summary[s]["methods"][m]["worst_loss"]["mean"] for s in settings for m in METHODS]
    spread = max(losses) - min(losses) or 0.1
    bars[0].set_ylim(min(losses) - spread, max(losses) + spread)  # the differences, not the common baseline
    bars[1].axhline(1 / report["config"]["mc_options"], color="grey", linestyle="--", label="chance")
    bars[1].set_ylim(0, 1)
    bars[0].legend(fontsize=7)
    bars[1].legend(fontsize=7)
    bottom = [0.0] * len(settings)
    for kind in CURVE_KINDS:
        values = [sum(r["seconds"].get(kind, 0.0) for sc in report["scenarios"] if sc["setting"] == s
                      for r in sc["methods"]["federated"]["training"]["rounds"]) for s in settings]
        bars[2].bar(list(xs), values, 0.6, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    bars[2].set_xticks(list(xs), settings, rotation=30, ha="right", fontsize=7)
    bars[2].set_title("federated round time by kind (s, all seeds)", fontsize=9)
    bars[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(out: Path, report: dict) -> None:
    from fednode.benchmark import BUDGET, MC_SCORING, markdown_table

    (out / "quality.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    cfg = report["config"]
    status = "complete" if report["complete"] else f"PARTIAL: {len(report['scenarios'])} scenarios so far"
    (out / "quality.md").write_text(
        f"# Quality benchmark: `{cfg['preset']}` ({status})\n\n"
        f"Base model `{cfg['model']}`, {cfg['clients']} hospitals, {cfg['rounds']} rounds x {cfg['train']['steps']} "
        f"steps (batch {cfg['train']['batch_size']}, lr {cfg['train']['lr']}), LoRA r={cfg['lora']['r']}; final round; "
        f"loss = completion cross-entropy on the hospital's own held-out split, cross loss = each hospital's model "
        f"on the other hospitals' splits; acc = multiple-choice accuracy ({cfg['mc_options']} options).\n\n"
        + markdown_table(report["summary"])
        + f"\nBudget: {BUDGET}.\n\nMultiple choice: {MC_SCORING}.\n")
    plot(report, out / "quality.png")


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"bench_quality: {exc}", file=sys.stderr)
        return 2
    import torch

    from fednode.benchmark import run_scenarios, summarize

    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"quality-{args.config}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"config": {"preset": args.config, **cfg.to_json()}, "machine": machine_info(args.threads),
              "complete": False, "scenarios": []}
    for record in run_scenarios(cfg, args.cache_dir, log):
        report["scenarios"].append(record)
        report["summary"] = summarize(cfg, report["scenarios"])
        report["seconds"] = time.perf_counter() - started
        write_outputs(out, report)
        log(f"[{len(report['scenarios'])}/{len(cfg.scenarios())} scenarios, {report['seconds']:.0f} s]")
    report["complete"] = True
    write_outputs(out, report)
    print((out / "quality.md").read_text())
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
