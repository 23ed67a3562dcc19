"""`fedchain audit`, in layers: `reconstruct` rebuilds the history from chain events and checks the contract's
commitments; `reverify` re-runs verification and the aggregator's merge from storage; `explain` names how a
mismatching global adapter was made; `report` holds the findings, `html` renders them as one page."""
from __future__ import annotations

from pathlib import Path

from .html import render_html
from .reconstruct import AuditError, run_audit
from .report import AuditReport, Status

__all__ = ["AuditError", "AuditReport", "Status", "run_audit", "save_report"]


def save_report(report: AuditReport, json_path: Path | None = None, html_path: Path | None = None) -> None:
    """Write the report as JSON and/or as a self-contained HTML page."""
    for path, text in ((json_path, report.to_json), (html_path, lambda: render_html(report))):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text())
