"""The benchmark's results over seeds: per setting and method the final metrics (mean, sd, values), each federated
method's differences to local-only and centralized training, and the markdown table the README quotes."""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from .quality import BASELINES, FEDERATED, BenchConfig, method_kind


SUMMARY_METRICS = ("mean_loss", "worst_loss", "loss_gap", "mean_acc", "worst_acc", "acc_gap")
DIFF_METRICS = ("worst_loss", "mean_loss", "cross_loss", "worst_acc", "mean_acc")
AGGREGATION_ERRORS = ("fedavg", "exact")  # lora_math.aggregation_error's overall relative errors


def summarize(cfg: BenchConfig, scenarios: Sequence[dict]) -> dict:
    """Per setting and method: every final summary metric over seeds (mean, sd, values); per federated method
    also its differences to local and to centralized, the platform's share of its round wall time, its DP
    epsilon (DP methods), its aggregation error over every round and seed (LoRA methods), the bytes a hospital
    uploads and downloads per round, and (beside FedAvg) its differences to FedAvg, paired by seed."""
    out = {}
    for setting in dict.fromkeys(s["setting"] for s in scenarios):
        runs = [s for s in scenarios if s["setting"] == setting]
        final = {m: {k: [s["methods"][m]["final"][k] for s in runs] for k in SUMMARY_METRICS}
                 | {"cross_loss": [s["methods"][m]["final"]["cross"]["loss"] for s in runs]} for m in cfg.method_names}
        methods = {}
        for m in cfg.method_names:
            methods[m] = {"kind": method_kind(m), "final": {k: _spread(v) for k, v in final[m].items()}}
            if m in FEDERATED:
                methods[m] |= _federated_summary(final, m, [s["methods"][m]["training"] for s in runs])
                if m != "fedavg" and "fedavg" in final:  # paired by seed: what the method changes against FedAvg
                    methods[m]["minus_fedavg"] = {k: _spread([f - v for f, v in zip(final[m][k], final["fedavg"][k])])
                                                  for k in DIFF_METRICS}
        out[setting] = {"seeds": [s["scenario"]["seed"] for s in runs], "methods": methods}
    return out


def _federated_summary(final: Mapping[str, dict], method: str, trainings: Sequence[dict]) -> dict:
    rounds = [r for t in trainings for r in t["rounds"]]
    platform, training, wall = (sum(r["seconds"].get(k, 0.0) for r in rounds) for k in ("platform", "training", "wall"))
    out = {f"minus_{b}": {k: _spread([f - v for f, v in zip(final[method][k], final[b][k])]) for k in DIFF_METRICS}
           for b in BASELINES}
    out["mean_loss_vs_centralized"] = _spread([f / c - 1 for f, c in zip(final[method]["mean_loss"],
                                                                         final["centralized"]["mean_loss"])])
    out["seconds"] = {"platform": platform, "training": training, "wall": wall,
                      "platform_fraction": platform / wall, "training_fraction": training / wall}
    if "privacy" in trainings[0]:
        out["epsilon"] = _spread([t["privacy"]["epsilon"] for t in trainings])
    if "bytes" in rounds[0]:  # per hospital per round
        out["bytes"] = {"upload": _spread([b for r in rounds for b in r["bytes"]["upload"]]),
                        "download": _spread([r["bytes"]["download"] for r in rounds])}
    if "aggregation_error" in rounds[0]:
        out["aggregation_error"] = {k: _spread([r["aggregation_error"][k] for r in rounds])
                                    for k in AGGREGATION_ERRORS if k in rounds[0]["aggregation_error"]}
    return out


def _aggregation_cell(method: Mapping) -> str:
    errors = method.get("aggregation_error", {})
    return " / ".join(f"{errors[k]['mean']:.2g}" if k in errors else "–" for k in AGGREGATION_ERRORS) \
        if errors else ""


def _spread(values: list[float]) -> dict:
    """Mean, sample sd and the half-width of the 95% Student-t interval of the mean (0 for one value)."""
    from scipy.stats import t

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    ci95 = float(t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "ci95": ci95, "values": values}


def markdown_table(summary: Mapping[str, dict]) -> str:
    """Settings x methods: final mean/worst loss, loss gap, cross loss, mean/worst accuracy (mean ± sd over seeds),
    DP epsilon and aggregation error where measured; then each federated method's differences to the baselines."""
    def cell(v: dict, digits: int) -> str:
        return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if len(v["values"]) > 1 else "")

    lines = [("| setting | method | mean loss | worst loss | loss gap | cross loss | mean acc | worst acc | epsilon | "
              "agg. error: FedAvg / SVD residual | seeds |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        for method, m in s["methods"].items():
            f = m["final"]
            epsilon = f"{m['epsilon']['mean']:.3g}" if "epsilon" in m else ""
            lines.append(f"| {setting} | {method} | {cell(f['mean_loss'], 4)} | {cell(f['worst_loss'], 4)} | "
                         f"{cell(f['loss_gap'], 4)} | {cell(f['cross_loss'], 4)} | {cell(f['mean_acc'], 3)} | "
                         f"{cell(f['worst_acc'], 3)} | {epsilon} | {_aggregation_cell(m)} | {len(s['seeds'])} |")
    def interval(v: dict, digits: int) -> str:
        return f"{v['mean']:.{digits}f}" + (f" ± {v['ci95']:.{digits}f}" if len(v["values"]) > 1 else "")

    lines += ["", ("Differences, paired by seed (± the 95% t-interval's half-width where there are several seeds):"),
              "", ("| setting | method | worst loss: - local | worst loss: - centralized | mean loss: - local | "
                   "mean loss: / centralized - 1 | cross loss: - local | worst acc: - local | "
                   "platform share of round time |"), "|---|---|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        for method, m in s["methods"].items():
            if m["kind"] == "federated":
                fl, fc, rel = m["minus_local"], m["minus_centralized"], m["mean_loss_vs_centralized"]
                lines.append(f"| {setting} | {method} | {interval(fl['worst_loss'], 4)} | "
                             f"{interval(fc['worst_loss'], 4)} | {interval(fl['mean_loss'], 4)} | "
                             f"{rel['mean']:+.2%}" + (f" ± {rel['ci95']:.2%}" if len(rel["values"]) > 1 else "")
                             + f" | {interval(fl['cross_loss'], 4)} | {interval(fl['worst_acc'], 3)} | "
                             f"{m['seconds']['platform_fraction']:.1%} |")
    return "\n".join(lines) + "\n"
