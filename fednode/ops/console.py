"""The console's conventions: exit codes, the version, and logging (notices on stderr, progress on stdout, both
at the level -v / -q choose)."""
from __future__ import annotations

import logging
import sys
from importlib import metadata

EXIT_CODES = """exit status: 0 success; 1 a check failed (audit: a MISMATCH or UNAVAILABLE round; status: storage
down; chain compile --check: stale artifacts; stack status: a service down); 2 a usage or runtime error (one line on
stderr); 3 audit: nothing failed but the last round is still open; 130 interrupted"""


def version() -> str:
    try:
        return metadata.version("fedchain")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and redirections replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def configure_logging(level: int) -> None:
    """fedchain's own notices (an unreachable chain or IPFS node, ...) as timestamped lines on stderr; the long
    steps' progress (`fedchain.progress`: node and aggregator, model builds) on stdout; both at `level`."""
    for name, handler in (("fedchain", _StderrHandler()), ("fedchain.progress", _StdoutHandler())):
        log = logging.getLogger(name)
        if not log.handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
            log.propagate = False
        log.setLevel(level)
