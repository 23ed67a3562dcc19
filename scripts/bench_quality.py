"""Non-IID medical benchmark: federated methods (full platform path) vs local-only vs centralized, worst hospital
in view.

    python scripts/bench_quality.py [--config tiny|tiny-full|methods|smollm2] [--methods fedavg,dp-1] [--out DIR]
                                    [--seeds 0,1] [--rounds 3] ...

Writes DIR/quality.json (every number, the exact config, machine info), DIR/quality.md (setting x method: mean
loss, worst loss, gap, cross loss, mean acc, worst acc, DP epsilon, aggregation error; each federated method minus
local and centralized) and DIR/quality.png (worst-hospital loss and accuracy per method, quality vs DP epsilon,
federated round time by kind). All three are rewritten after every scenario, so a long run shows its progress;
"complete" in the JSON turns true at the end. See research/quality.py for what each method does.
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
TIME_KINDS = ("training", "evaluation", "privacy", "storage", "chain", "verification", "aggregation")
KIND_COLORS = {"local": "tab:grey", "federated": "tab:blue", "centralized": "tab:green"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from research.quality import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="tiny", help="preset grid (default: tiny smoke run)")
    p.add_argument("--out", type=Path, help="output folder (default scripts/results/quality-<config>)")
    p.add_argument("--settings", help="comma-separated source:partition[:alpha], e.g. icd10:natural,drugs:dirichlet:1")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--methods", help="comma-separated federated methods (fednode/protocol/methods.py), e.g. fedavg,dp-1")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps per hospital per round")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--clients", type=int)
    p.add_argument("--train-per-client", type=int)
    p.add_argument("--eval-per-client", type=int)
    p.add_argument("--mc-items", type=int, help="multiple-choice questions per hospital")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished scenarios of DIR/quality.json when it was run with the same config")
    return parse_with_machine_args(p, argv)


def parse_with_machine_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p`'s arguments plus --threads and --cache-dir, which every benchmark takes."""
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on a busy 2-core box)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDCHAIN_CACHE", Path.home() / ".cache"
                                                                       / "fedchain")))
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    return args


def build_config(args: argparse.Namespace):
    from research.quality import PRESETS

    cfg = PRESETS[args.config]
    train = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
             if v is not None}
    fields = {k: getattr(args, k) for k in ("rounds", "clients", "train_per_client", "eval_per_client", "mc_items")
              if getattr(args, k) is not None}
    if args.settings:
        fields["settings"] = tuple(s.strip() for s in args.settings.split(","))
    if args.methods:
        fields["methods"] = tuple(s.strip() for s in args.methods.split(","))
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


def ordered_summary(report: dict) -> dict:
    """The summary with its settings and methods in run order (quality.json's keys are sorted)."""
    methods = ["local", *report["config"]["methods"], "centralized"]
    return {setting: {**report["summary"][setting], "methods": {m: report["summary"][setting]["methods"][m]
                                                               for m in methods}}
            for setting in dict.fromkeys(s["setting"] for s in report["scenarios"])}


def plot(report: dict, path: Path) -> None:
    """Per setting: worst-hospital final loss and MC accuracy per method (mean over seeds, sd as error bars);
    then worst-hospital loss vs DP epsilon for the DP methods, and federated round time by kind per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = ordered_summary(report)
    settings = list(summary)
    methods = list(summary[settings[0]]["methods"])
    fig, axes = plt.subplots(len(settings) + 1, 2, figsize=(12, 0.3 * len(methods) * (len(settings) + 1) + 3),
                             squeeze=False)
    ys = range(len(methods))
    for row, setting in zip(axes, settings):
        stats = summary[setting]["methods"]
        colors = [KIND_COLORS[stats[m]["kind"]] for m in methods]
        for ax, metric, label in ((row[0], "worst_loss", "worst-hospital loss (lower is better)"),
                                  (row[1], "worst_acc", "worst-hospital MC accuracy")):
            values = [stats[m]["final"][metric] for m in methods]
            ax.barh(list(ys), [v["mean"] for v in values], xerr=[v["sd"] for v in values], color=colors, capsize=2)
            ax.set_yticks(list(ys), methods, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{setting}: {label}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        # the axis spans the non-DP methods' means and error bars (not the common baseline); a DP bar beyond it
        # is labelled
        finals = [stats[m]["final"]["worst_loss"] for m in methods]
        losses = [f["mean"] for f in finals]
        shown = [f for m, f in zip(methods, finals) if "epsilon" not in stats[m]] or finals
        low, high = min(f["mean"] - f["sd"] for f in shown), max(f["mean"] + f["sd"] for f in shown)
        margin = 0.1 * (high - low) or 0.1
        right = high + margin
        row[0].set_xlim(low - margin, right)
        for y, loss in zip(ys, losses):
            if loss > right:
                row[0].text(right, y, f"{loss:.2f} >", ha="right", va="center", fontsize=7, color="white")
        row[1].axvline(1 / report["config"]["mc_options"], color="black", linestyle="--", linewidth=0.8)
        row[1].set_xlim(0, 1)
    epsilon_panel(axes[-1][0], summary)
    time_panel(axes[-1][1], report, report["config"]["methods"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def epsilon_panel(ax, summary: dict) -> None:
    """Worst-hospital loss vs the accountant's epsilon per setting (DP methods), fedavg and local as lines."""
    for i, (setting, s) in enumerate(summary.items()):
        color = f"C{i}"
        dp = sorted((m["epsilon"]["mean"], m["final"]["worst_loss"]["mean"]) for m in s["methods"].values()
                    if "epsilon" in m)
        if dp:
            ax.plot(*zip(*dp), marker="o", color=color, label=f"{setting} DP")
        for name, style in (("fedavg", "--"), ("local", ":")):
            if name in s["methods"]:
                ax.axhline(s["methods"][name]["final"]["worst_loss"]["mean"], color=color, linestyle=style,
                           linewidth=0.8, label=f"{setting} {name}")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon after the last round (RDP, delta of the rules)")
    ax.set_ylabel("worst-hospital loss")
    ax.set_title("quality vs privacy (DP methods)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def time_panel(ax, report: dict, federated: list[str]) -> None:
    """Federated round wall time by kind per method, summed over every scenario."""
    left = [0.0] * len(federated)
    for kind in TIME_KINDS:
        values = [sum(r["seconds"].get(kind, 0.0) for sc in report["scenarios"]
                      for r in sc["methods"][m]["training"]["rounds"]) for m in federated]
        ax.barh(range(len(federated)), values, 0.6, left=left, label=kind)
        left = [a + v for a, v in zip(left, values)]
    ax.set_yticks(range(len(federated)), federated, fontsize=7)
    ax.invert_yaxis()
    ax.set_title("federated round time by kind (s, all scenarios)", fontsize=9)
    ax.legend(fontsize=6)


def write_outputs(out: Path, report: dict) -> None:
    from research.quality import BUDGET
    from research.scoring import MC_SCORING
    from research.summary import markdown_table

    (out / "quality.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    cfg = report["config"]
    status = "complete" if report["complete"] else f"PARTIAL: {len(report['scenarios'])} scenarios so far"
    methods = cfg["federated_methods"]
    described = "".join(
        f"- `{name}`: {methods[name]['description']}"
        + ("; updates verified against FederationRules.norm_bound: max_update_norm, or the DP noise's own norm "
           "bound where larger" if methods[name]["privacy"] else "") + "\n" for name in cfg["methods"])
    (out / "quality.md").write_text(
        f"# Quality benchmark: `{cfg['preset']}` ({status})\n\n"
        f"Base model `{cfg['model']}`, {cfg['clients']} hospitals, {cfg['rounds']} rounds x {cfg['train']['steps']} "
        f"steps (batch {cfg['train']['batch_size']}, lr {cfg['train']['lr']}), LoRA r={cfg['lora']['r']}, prompt "
        f"tuning {cfg['prompt']['num_virtual_tokens']} virtual tokens; final round; loss = completion cross-entropy "
        f"on the hospital's own held-out split (with the hospital's own model: its rank, its private adapter), "
        f"cross loss = each hospital's model on the other hospitals' splits; acc = multiple-choice accuracy "
        f"({cfg['mc_options']} options); epsilon = the DP accountant's (RDP) after the last round; agg. error = "
        f"relative Frobenius error, against the weighted mean of the round's accepted updates' LoRA products, of "
        f"plain FedAvg's product (equal ranks only) / of the exact merge's SVD truncation to the global rank, mean "
        f"over every round and seed.\n\n"
        + markdown_table(ordered_summary(report))
        + f"\nFederated methods (local and centralized train LoRA r={cfg['lora']['r']}):\n\n{described}"
        + f"\nBudget: {BUDGET}.\n\nMultiple choice: {MC_SCORING}.\n")
    plot(report, out / "quality.png")


def resumed(path: Path, fresh: dict) -> dict:
    """The earlier report at `path` when it ran the same config (its finished scenarios are kept), else `fresh`."""
    if not path.exists():
        return fresh
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot resume: {path} is not JSON ({exc})") from None
    if earlier.get("config") != fresh["config"]:
        raise ValueError(f"cannot resume: {path} was run with another config; pass another --out or drop --resume")
    log(f"resuming {path}: {len(earlier['scenarios'])} scenarios done")
    return {**earlier, "complete": False}


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

    from research.quality import run_scenarios
    from research.summary import summarize

    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"quality-{args.config}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"config": {"preset": args.config, **cfg.to_json()}, "machine": machine_info(args.threads),
              "complete": False, "scenarios": [], "seconds": 0.0}
    if args.resume:
        try:
            report = resumed(out / "quality.json", report)
        except ValueError as exc:
            print(f"bench_quality: {exc}", file=sys.stderr)
            return 2
    done, earlier = {s["name"] for s in report["scenarios"]}, report["seconds"]
    for record in run_scenarios(cfg, args.cache_dir, log, skip=done):
        report["scenarios"].append(record)
        report["summary"] = summarize(cfg, report["scenarios"])
        report["seconds"] = earlier + time.perf_counter() - started
        write_outputs(out, report)
        log(f"[{len(report['scenarios'])}/{len(cfg.scenarios())} scenarios, {report['seconds']:.0f} s]")
    report["complete"] = True
    write_outputs(out, report)
    print((out / "quality.md").read_text())
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
