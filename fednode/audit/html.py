"""The audit report as one self-contained HTML page: inline CSS and inline SVG plots drawn here, no scripts, no
network, so it opens from disk in any browser."""
from __future__ import annotations

import html
import json
import math

from .report import FAILED, AuditReport, RoundAudit, Status, short

COLOURS = {Status.VERIFIED: "#2e7d32", Status.CONSISTENT: "#00796b", Status.MISMATCH: "#c62828",
           Status.UNAVAILABLE: "#ef6c00", Status.OPEN: "#1565c0", Status.CANCELLED: "#757575"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22"]
GAS_KINDS = (("open", "#90caf9"), ("submit", "#a5d6a7"), ("finalize", "#ffcc80"))
METRICS = (("train_loss", "local training loss"), ("global_eval_loss", "held-out loss of the round's start adapter"),
           ("update_norm", "update norm ||update - start||"))
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,Menlo,Consolas,monospace}.muted{color:#666}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}
.finding{margin:4px 0;padding:6px 10px;border-left:4px solid;background:#fff8f6}
.note{margin:4px 0;padding:4px 10px;border-left:4px solid #90a4ae;background:#f7f9fa}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg{background:#fff;border:1px solid #e0e0e0}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: Status) -> str:
    return f'<span class="badge" style="background:{COLOURS[status]}">{_e(status.value)}</span>'


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """A table whose cells are already HTML."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= count)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(value: float, step: float | None = None) -> str:
    """A number for an axis label; with the tick step, exactly as many decimals as the step needs, so
    neighbouring ticks never print alike."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if step:
        return f"{value:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"
    return f"{value:.3g}"


class _Plot:
    """A plot area inside an SVG with linear x and y scales."""

    def __init__(self, width: int, height: int, x: tuple[float, float], y: tuple[float, float],
                 margin: tuple[int, int, int, int] = (28, 16, 36, 56)):
        self.width, self.height = width, height
        self.top, self.right, self.bottom, self.left = margin
        self.x0, self.x1 = x if x[1] > x[0] else (x[0] - 1, x[0] + 1)
        self.y0, self.y1 = y if y[1] > y[0] else (y[0] - 1, y[0] + 1)
        self.parts: list[str] = []

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def sy(self, y: float) -> float:
        return self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)

    def axes(self, title: str, xs: list[float] | None = None, y_ticks: bool = True, x_label: str = "",
             x_ticks: int = 5) -> None:
        p = self.parts
        p.append(f'<text x="{self.left}" y="16" style="font-weight:600">{_e(title)}</text>')
        if y_ticks:
            ticks = _ticks(self.y0, self.y1)
            step = ticks[1] - ticks[0] if len(ticks) > 1 else None
            for t in ticks:
                y = self.sy(t)
                p.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'stroke="#eee"/><text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t, step)}</text>')
        for t in xs if xs is not None else _ticks(self.x0, self.x1, x_ticks):
            x = self.sx(t)
            p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.height - self.bottom}" '
                     f'y2="{self.height - self.bottom + 4}" stroke="#999"/><text x="{x:.1f}" '
                     f'y="{self.height - self.bottom + 16}" text-anchor="middle">{_fmt(t)}</text>')
        p.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{self.height - self.bottom}" '
                 f'y2="{self.height - self.bottom}" stroke="#999"/>')
        if x_label:
            p.append(f'<text x="{(self.left + self.width - self.right) / 2:.0f}" y="{self.height - self.bottom + 30}" '
                     f'text-anchor="middle" class="muted">{_e(x_label)}</text>')

    def svg(self, label: str) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'role="img" aria-label="{_e(label)}">' + "".join(self.parts) + "</svg>")


def timeline(report: AuditReport) -> str:
    """Blocks on x: one lane per round (opened to closed, coloured by status, a tick per submission) and one lane
    for the registry (joins, approvals, revocations)."""
    lanes = len(report.rounds) + 1
    plot = _Plot(1140, 60 + 26 * lanes, (report.from_block, max(report.head_block, report.from_block + 1)),
                 (0, lanes), margin=(28, 16, 36, 80))
    plot.axes("timeline", y_ticks=False, x_label="block", x_ticks=12)
    p = plot.parts
    marks = {"joined": "#1565c0", "approved": "#2e7d32", "revoked": "#c62828"}
    for k, (word, colour) in enumerate(marks.items()):
        x = plot.width - 300 + 95 * k
        p.append(f'<circle cx="{x}" cy="12" r="4" fill="{colour}"/><text x="{x + 8}" y="16">{word}</text>')

    def lane_y(i: int) -> float:
        return plot.sy(lanes - i - 0.5)

    p.append(f'<text x="8" y="{lane_y(0) + 4:.1f}">registry</text>')
    for part in report.participants:
        for kind, block in (("joined", part.joined_block), ("approved", part.approved_block),
                            ("revoked", part.revoked_block)):
            if block is not None:
                p.append(f'<circle cx="{plot.sx(block):.1f}" cy="{lane_y(0):.1f}" r="{5 if kind == "revoked" else 3.5}"'
                         f' fill="{marks[kind]}"><title>{_e(part.hospital or part.address)} {kind} at block {block}'
                         f'</title></circle>')
    for i, r in enumerate(report.rounds, start=1):
        y = lane_y(i)
        end = r.result.block if r.result else r.cancelled_block or report.head_block
        x0, x1 = plot.sx(r.opened_block), plot.sx(end)
        p.append(f'<text x="8" y="{y + 4:.1f}">round {r.round_id}</text><rect x="{x0:.1f}" y="{y - 8:.1f}" '
                 f'width="{max(x1 - x0, 3):.1f}" height="16" rx="3" fill="{COLOURS[r.status]}" fill-opacity="0.35" '
                 f'stroke="{COLOURS[r.status]}"><title>round {r.round_id}: blocks {r.opened_block}-{end}, '
                 f'{r.status.value}</title></rect>')
        for s in r.submissions:
            p.append(f'<line x1="{plot.sx(s.block):.1f}" x2="{plot.sx(s.block):.1f}" y1="{y - 8:.1f}" '
                     f'y2="{y + 8:.1f}" stroke="#333"><title>update #{s.index} from {_e(s.hospital or s.node)} at '
                     f'block {s.block}</title></line>')
    return plot.svg("round timeline")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str) -> str:
    points = [pt for pts in series.values() for pt in pts]
    if not points:
        return ""
    xs, ys = sorted({x for x, _ in points}), [y for _, y in points]
    pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.05 or 1.0
    rows = math.ceil(len(series) / 3)
    plot = _Plot(370, 230 + 14 * rows, (xs[0] - 0.3, xs[-1] + 0.3), (min(ys) - pad, max(ys) + pad),
                 margin=(28, 12, 36 + 14 * rows, 52))
    plot.axes(title, xs=xs, x_label=x_label)
    p = plot.parts
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{plot.sx(x):.1f},{plot.sy(y):.1f}" for j, (x, y) in enumerate(pts))
        p.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        for x, y in pts:
            p.append(f'<circle cx="{plot.sx(x):.1f}" cy="{plot.sy(y):.1f}" r="3" fill="{colour}"><title>'
                     f'{_e(name)} round {x:g}: {y:.4g}</title></circle>')
        lx = plot.left + (k % 3) * 105
        ly = plot.height - plot.bottom + 44 + (k // 3) * 14
        p.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
                 f'<text x="{lx + 14}" y="{ly}">{_e(short(name, 14))}</text>')
    return plot.svg(title)


def gas_chart(report: AuditReport) -> str:
    """Stacked gas per round: the open, submission and finalize transactions."""
    totals = [(r.round_id, {"open": r.open_gas, "submit": sum(s.gas for s in r.submissions),
                            "finalize": r.result.gas if r.result else 0}) for r in report.rounds]
    if not totals:
        return ""
    top = max(sum(t.values()) for _, t in totals)
    plot = _Plot(560, 260, (0.4, len(totals) + 0.6), (0, top * 1.08), margin=(28, 12, 40, 70))
    plot.axes("gas per round", xs=[i for i, _ in totals], x_label="round")
    width = min(40.0, (plot.width - plot.left - plot.right) / len(totals) * 0.6)
    for round_id, t in totals:
        base = 0
        for kind, colour in GAS_KINDS:
            y0, y1 = plot.sy(base), plot.sy(base + t[kind])
            plot.parts.append(f'<rect x="{plot.sx(round_id) - width / 2:.1f}" y="{y1:.1f}" width="{width:.1f}" '
                              f'height="{max(y0 - y1, 0):.1f}" fill="{colour}"><title>round {round_id} {kind}: '
                              f'{t[kind]:,} gas</title></rect>')
            base += t[kind]
    for k, (kind, colour) in enumerate(GAS_KINDS):
        x = plot.width - 250 + 80 * k
        plot.parts.append(f'<rect x="{x}" y="7" width="10" height="10" fill="{colour}"/><text x="{x + 14}" y="16">'
                          f'{kind}</text>')
    return plot.svg("gas per round")


def metric_series(report: AuditReport, key: str) -> dict[str, list[tuple[float, float]]]:
    """Per participant, (round, value) from the metrics documents, or the update norm from verification."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in report.rounds:
        for s in r.submissions:
            value = s.update_norm if key == "update_norm" else (s.metrics or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(s.hospital or short(s.node, 10), []).append((r.round_id, float(value)))
    return dict(sorted(series.items()))


def _verdict_summary(report: AuditReport) -> str:
    rows = []
    for r in report.rounds:
        rejected: dict[str, int] = {}
        for s in r.submissions:
            if s.verdict and s.verdict != "ACCEPTED":
                rejected[s.verdict] = rejected.get(s.verdict, 0) + 1
        res = r.result
        recomputed = "" if res is None or res.recomputed_merged is None else \
            ",".join(f"#{i}" for i in res.recomputed_merged)
        match = "" if res is None or res.recomputed_sha256 is None else "bit-identical" \
            if res.recomputed_sha256 == res.file_sha256 else "within tolerance" \
            if r.status == Status.VERIFIED else "differs"
        eps = f"{r.privacy['epsilon']:.3g}" if r.privacy else ""
        rows.append([f"round {r.round_id}", _badge(r.status), str(len(r.submissions)),
                     str(len(res.merged)) if res else "", _e(", ".join(f"{k} ×{v}" for k, v in rejected.items())),
                     _e(",".join(f"#{i}" for i in res.merged) if res else ""), _e(recomputed), _e(match), eps])
    return _table(["round", "status", "updates", "merged", "rejected (on-chain reason)", "on-chain merged",
                   "recomputed merged", "global adapter", "DP epsilon"], rows, {2, 3, 8})


def _participants(report: AuditReport) -> str:
    rows = [[_e(p.hospital or ""), f"<code>{_e(p.address)}</code>", f"<code>{_e(short(p.model_id, 18))}</code>",
             str(p.joined_block), str(p.approved_block or ""),
             f"{p.revoked_block} (reason {p.revoke_reason})" if p.revoked_block is not None else "",
             _e(" / ".join(f"{k} {v:,}" for k, v in p.gas.items()))] for p in report.participants]
    return _table(["hospital", "address", "model identity", "joined", "approved", "revoked", "gas"], rows, {3, 4})


def _round_section(r: RoundAudit) -> str:
    out = [f'<h3 id="round-{r.round_id}">round {r.round_id} {_badge(r.status)} <span class="muted">{_e(r.state)}, '
           f'opened at block {r.opened_block} by <code>{_e(r.opener)}</code>, deadline {r.deadline}, quorum '
           f'{r.min_updates}</span></h3>']
    for f in r.findings:
        out.append(f'<div class="finding" style="border-color:{COLOURS[f.status]}"><b>{_e(f.status.value)}</b> '
                   f'{_e(f.message)}</div>')
    out += [f'<div class="note">{_e(n)}</div>' for n in r.notes]
    rules = "" if r.rules is None else ", ".join(
        f"{k} {json.dumps(r.rules.get(k))}" for k in ("aggregation", "weighting", "params", "max_update_norm",
                                                      "adapter", "client", "privacy") if r.rules.get(k) != {})
    out.append(f'<p class="muted">start adapter <code>{_e(r.base_cid)}</code>; rules <code>'
               f'{_e(short(r.rules_digest, 16))}</code> {_e(rules)}</p>')
    rows = []
    for s in r.submissions:
        changed = s.recomputed and s.recomputed != s.verdict
        rows.append([f"#{s.index}", _e(s.hospital or ""), f"<code>{_e(short(s.node, 12))}</code>",
                     str(s.num_samples), f"<code>{_e(short(s.cid, 20))}</code>", _e(s.verdict or "pending"),
                     (f"<b style='color:{COLOURS[Status.MISMATCH]}'>{_e(s.recomputed)}</b>" if changed
                      else _e(s.recomputed or "")),
                     "" if s.update_norm is None else f"{s.update_norm:.4f}",
                     "" if not s.metrics else f"{s.metrics.get('train_loss', float('nan')):.4f}",
                     f"{s.gas:,}", _badge(s.status) if s.status else ""])
    out.append(_table(["#", "hospital", "node", "samples", "update CID", "on-chain verdict", "re-verified",
                       "norm", "train loss", "gas", "audit"], rows, {3, 7, 8, 9}))
    if r.result:
        res = r.result
        out.append(f'<p>global adapter <code>{_e(res.cid)}</code> by <code>{_e(short(res.aggregator, 12))}</code> '
                   f'at block {res.block}, gas {res.gas:,}; sha256 <code>{_e(short(res.file_sha256, 16))}</code>'
                   + (f', recomputed <code>{_e(short(res.recomputed_sha256, 16))}</code>'
                      if res.recomputed_sha256 else "") + "</p>")
    return "".join(out)


def _comparison(c: dict) -> list[str]:
    """The demo's federated vs local-only table (computed where the data is, not from the chain)."""
    rows = [[_e(r["hospital"]), f"{r['federated']:.4f}", f"{r['local']:.4f}", f"{r['federated_cross']:.4f}",
             f"{r['local_cross']:.4f}"] for r in c["rows"]]
    wf = next(r for r in c["rows"] if r["hospital"] == c["worst_federated"])
    wl = next(r for r in c["rows"] if r["hospital"] == c["worst_local"])
    worst = (f"Worst hospital: federated {wf['federated']:.4f} ({_e(wf['hospital'])}) against local only "
             f"{wl['local']:.4f} ({_e(wl['hospital'])}), a lift of {c['lift']:+.4f} nats.")
    return ["<h2>What federation bought each hospital</h2>",
            f'<p class="muted">Held-out completion loss (lower is better) after the same {c["steps"]} local steps '
            f'per hospital, federated or alone; "others" is the mean over the other hospitals\' splits. Computed '
            f'by the demo where the data is; not re-derived from the chain.</p>',
            _table(["hospital", "own: federated", "own: local only", "others: federated", "others: local only"],
                   rows, {1, 2, 3, 4}),
            f"<p>{worst}</p>"]


def render_html(report: AuditReport) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items()) or "no rounds"
    charts = "".join(line_chart(title, metric_series(report, key), "round") for key, title in METRICS)
    seconds = ", ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items())
    worst = [s for s in FAILED if any(r.status == s for r in report.rounds)]
    verdict = worst[0] if worst else Status.VERIFIED if report.verified else Status.CONSISTENT
    findings = [f'<div class="finding" style="border-color:{COLOURS[f.status]}"><a href="#round-{r.round_id}">round '
                f'{r.round_id}</a> <b>{_e(f.status.value)}</b> {_e(f.message)}</div>'
                for r in report.rounds for f in r.findings]
    body = [
        f"<h1>fedchain audit {_badge(verdict)}</h1>",
        f'<p class="muted">federation <code>{_e(report.federation_id)}</code>, contract <code>{_e(report.contract)}'
        f'</code> on chain {report.chain_id}; blocks {report.from_block}-{report.head_block}, {report.events} events; '
        f'storage {_e(report.storage or "none")}; {"re-verified from storage" if report.verified else "chain only"}'
        f'</p>',
        f'<p id="summary"><b>{len(report.rounds)} rounds</b>: {_e(counts)}; <b>{len(report.participants)} '
        f'participants</b>. Audit time: {_e(seconds)}.</p>',
        "<h2>Verdicts</h2>", _verdict_summary(report),
        *(["<h2>Findings</h2>", *findings] if findings else []),
        "<h2>Timeline</h2>", timeline(report),
        "<h2>Participants</h2>", _participants(report),
        "<h2>Per-client metrics</h2>",
        f'<div class="charts">{charts}</div>' if charts else '<p class="muted">no metrics documents available</p>',
        *(_comparison(report.comparison) if report.comparison else []),
        "<h2>Gas</h2>", gas_chart(report),
        "<h2>Rounds</h2>", *(_round_section(r) for r in report.rounds),
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedchain audit "
            f"{_e(report.federation_id)}</title><style>{CSS}</style></head><body>" + "\n".join(body)
            + "</body></html>\n")
