"""Helpers shared by the test modules (imported as `support`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(check, error: type[Exception], what: str) -> None:
    """Run `check()`; if it raises `error` the real component is missing: skip, or fail under CI=true."""
    try:
        check()
    except error as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI=true: the {what} tests must run)")
        pytest.skip(str(exc))
