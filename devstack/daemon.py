"""Background service processes (anvil, an IPFS node): started detached with a log and a pid file in a state
folder, health-checked over HTTP, stopped by pid (the whole process group)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable


class DaemonError(RuntimeError):
    """A service did not start, or could not be stopped."""


def post_json(url: str, body: bytes, timeout: float = 1.0, headers: dict | None = None) -> dict | None:
    """The JSON answer to a POST, or None when nothing (sensible) answers."""
    request = urllib.request.Request(url, body, headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def pid_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.pid"


def recorded_pid(state_dir: Path, name: str) -> int | None:
    path = pid_file(state_dir, name)
    return int(path.read_text().strip()) if path.is_file() else None


def alive(pid: int) -> bool:
    """Whether process group `pid` still has a live member (our own dead child is reaped first)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def spawn(name: str, args: list[str], state_dir: Path, ready: Callable[[], bool], timeout: float,
          env: dict | None = None) -> int:
    """Start `args` in its own session, output appended to state_dir/<name>.log, pid in state_dir/<name>.pid;
    return its pid once `ready()` holds. On failure nothing is left running."""
    state_dir = Path(state_dir)
    log_path = state_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    pid_file(state_dir, name).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file(state_dir, name).unlink(missing_ok=True)
            raise DaemonError(f"{name} exited with code {proc.returncode}; see {log_path}")
        if ready():
            return proc.pid
        time.sleep(0.1)
    stop(name, state_dir)
    raise DaemonError(f"{name} did not answer within {timeout:.0f} s; see {log_path}")


def _signal_group(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send `sig` to process group `pid`; whether the group is gone within `timeout`."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(name: str, state_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the service whose pid is in state_dir/<name>.pid: SIGTERM its process group, SIGKILL after
    `timeout`. False if none was running."""
    pid = recorded_pid(state_dir, name)
    if pid is None:
        return False
    running = alive(pid)
    if running and not _signal_group(pid, signal.SIGTERM, timeout) and not _signal_group(pid, signal.SIGKILL, 5.0):
        raise DaemonError(f"{name} (pid {pid}) survived SIGKILL; see {Path(state_dir) / f'{name}.log'}")
    pid_file(state_dir, name).unlink()
    return running
