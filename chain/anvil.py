"""Start and stop a real local testnet: the anvil binary shipped by npm `@foundry-rs/anvil-linux-amd64`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .compiler import project_root


class AnvilError(RuntimeError):
    """anvil is missing, did not start, or could not be stopped."""


def anvil_binary(root: Path | None = None) -> Path:
    root = root or project_root()
    local = root / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
    if local.is_file():
        return local
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise AnvilError("anvil not found: run `npm ci` (installs @foundry-rs/anvil-linux-amd64)")


def rpc_ready(url: str, timeout: float = 1.0) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return "result" in json.loads(response.read())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class AnvilProcess:
    pid: int
    url: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "anvil.pid"


def start(state_dir: Path, port: int = 8545, block_time: float | None = None,
          timeout: float = 30.0) -> AnvilProcess:
    """Start anvil on 127.0.0.1:port in the background, its chain state kept in state_dir (survives a restart),
    log in state_dir/anvil.log, pid in state_dir/anvil.pid. Returns once it answers eth_chainId."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    if rpc_ready(url):
        raise AnvilError(f"something already answers JSON-RPC at {url}; stop it or pick another port")
    args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port),
            "--state", str(state_dir / "anvil-state.json"), "--state-interval", "5"]
    if block_time:
        args += ["--block-time", str(block_time)]
    log = open(state_dir / "anvil.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    handle = AnvilProcess(proc.pid, url, state_dir)
    handle.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AnvilError(f"anvil exited with code {proc.returncode}; see {state_dir / 'anvil.log'}")
        if rpc_ready(url):
            return handle
        time.sleep(0.1)
    stop(state_dir)
    raise AnvilError(f"anvil did not answer at {url} within {timeout:.0f} s; see {state_dir / 'anvil.log'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def stop(state_dir: Path, timeout: float = 10.0) -> bool:
    """Stop the anvil whose pid is in state_dir/anvil.pid (SIGTERM, then SIGKILL). False if none was running."""
    pid_file = Path(state_dir) / "anvil.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip())
    stopped = False
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        stopped = True
    pid_file.unlink()
    return stopped
