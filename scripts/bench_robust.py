"""Dishonest hospitals against the aggregation rules: every rule of research/robustness.py under every attack
scenario (research/attacks.py), through the full platform path, on 5 non-IID hospitals.

    python scripts/bench_robust.py [--config tiny|smoke|smollm2] [--out DIR] [--threads 1]

Writes DIR/robust.json (every run: the honest hospitals' losses, verdicts; the summary against the clean FedAvg
run; the exact config, machine info), DIR/robust.md (the README's tables) and DIR/robust.png, after every partition.
A rerun with the same config resumes: finished partitions in robust.json are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_quality import machine_info, parse_with_machine_args

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from research.robustness import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--out", type=Path, help="output folder (default scripts/results/robust-<config>)")
    return parse_with_machine_args(p, argv)


def plot(cfg, summary: dict, path: Path) -> None:
    """Per setting, a rules x scenarios heat map of the worst honest loss minus the clean FedAvg run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 0.5 * len(cfg.rules) + 2.5), squeeze=False)
    columns = [f"{a} x{m}" if m else "none" for a, m in cfg.scenarios]
    for ax, (setting, s) in zip(axes[0], summary.items()):
        grid = np.array([[s["runs"][f"{r}/{a}/{m}"]["worst_loss_minus_clean_fedavg"]["mean"]
                          for a, m in cfg.scenarios] for r in cfg.rules])
        image = ax.imshow(np.clip(grid, -0.1, 1.0), cmap="RdYlGn_r", vmin=-0.1, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:+.2f}" if abs(value) < 10 else f"{value:+.0f}", ha="center", va="center",
                    fontsize=6)
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(cfg.rules)), cfg.rules, fontsize=7)
        ax.set_title(f"{setting}: worst honest loss - clean FedAvg", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(out: Path, cfg, report: dict) -> None:
    from research.robustness import markdown

    (out / "robust.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    if report["summary"]:
        (out / "robust.md").write_text(markdown(cfg, report["summary"]))
        plot(cfg, report["summary"], out / "robust.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from research.robustness import PRESETS, run_partitions, summarize

    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.config]
    out = args.out or RESULTS / f"robust-{args.config}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"preset": args.config, **cfg.to_json()}
    previous = json.loads((out / "robust.json").read_text()) if (out / "robust.json").is_file() else None
    records = previous["partitions"] if previous and previous["config"] == config else []
    started = time.perf_counter() - (previous or {}).get("seconds", 0.0) if records else time.perf_counter()
    report = {"config": config, "machine": machine_info(args.threads), "complete": False, "partitions": records,
              "summary": summarize(cfg, records) if records else {}}
    for record in run_partitions(cfg, args.cache_dir, [r["name"] for r in records], lambda m: print(m, flush=True)):
        records.append(record)
        report.update(summary=summarize(cfg, records), seconds=time.perf_counter() - started)
        write_outputs(out, cfg, report)
        print(f"[{len(records)}/{len(cfg.partitions())} partitions, {report['seconds']:.0f} s]", flush=True)
    report.update(complete=True, seconds=time.perf_counter() - started)
    write_outputs(out, cfg, report)
    print((out / "robust.md").read_text())
    print(f"wrote {out / 'robust.json'}, {out / 'robust.md'}, {out / 'robust.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
