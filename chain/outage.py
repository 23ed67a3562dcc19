"""Riding out a service that is briefly unreachable (a restarted chain node or IPFS daemon): the call is retried with
capped exponential backoff, one notice is given when the outage starts and one when it ends, and the caller gets a
one-line error only after the outage budget is spent. Once a budget was spent, later calls fail after one try until
the service answers again, so a long outage costs one budget, not one per call."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
LOG = logging.getLogger("fedchain")
DEFAULT_OUTAGE_SECONDS = 300.0


class OutageError(ConnectionError):
    """The service stayed unreachable for the whole outage budget; `reason` is the last failure in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Outage:
    """The availability of one service, named `what` in notices (e.g. "chain RPC http://127.0.0.1:8545")."""

    def __init__(self, what: str, budget_s: float = DEFAULT_OUTAGE_SECONDS, first_s: float = 0.5, cap_s: float = 4.0,
                 notify: Callable[[str], None] | None = None):
        if not budget_s >= 0:
            raise ValueError(f"the outage budget must be >= 0 seconds, got {budget_s!r}")
        self.what = what
        self.budget_s = budget_s
        self.first_s = first_s
        self.cap_s = cap_s
        self.notify = notify or LOG.warning
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time the current outage started
        self._given_up = False

    def call(self, fn: Callable[[], T], retryable: Callable[[BaseException], bool]) -> T:
        """fn(), retried while it raises an exception `retryable` accepts, within the outage budget."""
        delay = self.first_s
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not retryable(exc):
                    raise
                delay = self._failed(exc, delay)
                continue
            self._answered()
            return result

    def _failed(self, exc: BaseException, delay: float) -> float:
        """Wait before the next try, or raise OutageError when the budget is spent; the next delay."""
        now = time.monotonic()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                self.notify(f"{self.what} unreachable ({_reason(exc)}); retrying in {delay:g} s, for up to "
                            f"{self.budget_s:g} s")
            down_for = now - self._down_since
            if self._given_up or down_for + delay > self.budget_s:
                self._given_up = True
                raise OutageError(f"{self.what} unreachable for {down_for:.0f} s ({_reason(exc)}); giving up",
                                  _reason(exc)) from None
        time.sleep(delay)
        return min(2 * delay, self.cap_s)

    def _answered(self) -> None:
        with self._lock:
            if self._down_since is not None:
                self.notify(f"{self.what} reachable again after {time.monotonic() - self._down_since:.1f} s")
            self._down_since, self._given_up = None, False


def _reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return type(exc).__name__
