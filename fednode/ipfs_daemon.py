"""Start and stop a real local IPFS node: Kubo (``ipfs`` on PATH) if present, else js-ipfs from npm ``ipfs``.

The node is offline and private: HTTP RPC API on 127.0.0.1 only, no gateway, no swarm listeners,
no bootstrap peers, no MDNS (Kubo's and js-ipfs's ``test`` profile).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from chain.compiler import project_root


class IpfsDaemonError(RuntimeError):
    """No IPFS implementation is installed, or the daemon did not start or could not be stopped."""


def ipfs_command(root: Path | None = None) -> tuple[str, list[str]]:
    """``("kubo", [ipfs])`` if Kubo is on PATH, else ``("js-ipfs", [node, --require polyfill, cli.js])``."""
    kubo = shutil.which("ipfs")
    if kubo:
        return "kubo", [kubo]
    root = root or project_root()
    cli = root / "node_modules" / "ipfs" / "src" / "cli.js"
    if not cli.is_file():
        raise IpfsDaemonError("no IPFS implementation found: run `npm ci` (installs js-ipfs, npm `ipfs`)")
    node = shutil.which("node")
    if not node:
        raise IpfsDaemonError("js-ipfs needs Node.js, but `node` is not on PATH")
    # Node 20 lacks Promise.withResolvers, which js-ipfs's dependencies call.
    return "js-ipfs", [node, "--require", str(root / "scripts" / "ipfs-polyfill.cjs"), str(cli)]


def api_ready(api_url: str, timeout: float = 1.0) -> bool:
    """Whether an IPFS RPC API answers ``POST api_url/api/v0/version``."""
    request = urllib.request.Request(f"{api_url}/api/v0/version", b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return "Version" in json.loads(response.read())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class IpfsProcess:
    pid: int
    api_url: str
    multiaddr: str
    kind: str  # "kubo" or "js-ipfs"
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "ipfs.pid"


def _alive(pid: int) -> bool:
    """Whether process group ``pid`` still has a live member (our own dead child is reaped first)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def _recorded_pid(state_dir: Path) -> int | None:
    pid_file = state_dir / "ipfs.pid"
    return int(pid_file.read_text().strip()) if pid_file.is_file() else None


def _configure(repo: Path, api_port: int) -> None:
    """Point the repo's API at 127.0.0.1:api_port; no gateway, swarm listeners or js-ipfs gRPC port."""
    path = repo / "config"
    config = json.loads(path.read_text())
    addresses = config["Addresses"]
    addresses.update(API=f"/ip4/127.0.0.1/tcp/{api_port}", Gateway=[], Swarm=[])
    addresses.pop("RPC", None)  # js-ipfs's gRPC server (fixed port 5003) starts only if this is set
    path.write_text(json.dumps(config, indent=2))


def start(state_dir: Path, api_port: int = 5001, timeout: float = 60.0) -> IpfsProcess:
    """Start an offline IPFS daemon with its API on 127.0.0.1:api_port, repo in state_dir/ipfs-repo
    (initialised with the ``test`` profile on first use; survives a restart), log in state_dir/ipfs.log,
    pid in state_dir/ipfs.pid. Returns once it answers /api/v0/version."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{api_port}"
    if api_ready(api_url):
        raise IpfsDaemonError(f"something already answers the IPFS API at {api_url}; stop it or pick another port")
    pid = _recorded_pid(state_dir)
    if pid and _alive(pid):
        raise IpfsDaemonError(f"an IPFS daemon already runs on {state_dir} (pid {pid}); stop it first")
    stop(state_dir)  # clears the pid file and repo lock of a daemon that died unstopped
    kind, command = ipfs_command()
    repo = state_dir / "ipfs-repo"
    env = {**os.environ, "IPFS_PATH": str(repo), "NO_UPDATE_NOTIFIER": "1"}  # js-ipfs's CLI polls npm weekly
    log_path = state_dir / "ipfs.log"
    with open(log_path, "ab") as log:
        if not (repo / "config").is_file():
            init_args = [*command, "init", "--profile", "test", "--empty-repo"]
            try:
                init = subprocess.run(init_args, check=False, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise IpfsDaemonError(f"`{kind} init` took over {timeout:.0f} s; see {log_path}") from None
            if init.returncode:
                raise IpfsDaemonError(f"`{kind} init` failed with code {init.returncode}; see {log_path}")
        _configure(repo, api_port)
        daemon = ["daemon", "--offline"] + (["--enable-preload=false"] if kind == "js-ipfs" else [])
        proc = subprocess.Popen([*command, *daemon], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    handle = IpfsProcess(proc.pid, api_url, f"/ip4/127.0.0.1/tcp/{api_port}/http", kind, state_dir)
    handle.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise IpfsDaemonError(f"{kind} daemon exited with code {proc.returncode}; see {log_path}")
        if api_ready(api_url):
            return handle
        time.sleep(0.1)
    stop(state_dir)
    raise IpfsDaemonError(f"{kind} daemon did not answer at {api_url} within {timeout:.0f} s; see {log_path}")


def _signal_group(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send ``sig`` to process group ``pid``; whether the group is gone within ``timeout``."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(state_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the daemon whose pid is in state_dir/ipfs.pid: SIGTERM its process group, SIGKILL it after
    ``timeout``. False if none was running."""
    state_dir = Path(state_dir)
    pid = _recorded_pid(state_dir)
    if pid is None:
        return False
    stopped = _alive(pid)
    if stopped and not _signal_group(pid, signal.SIGTERM, timeout) and not _signal_group(pid, signal.SIGKILL, 5.0):
        raise IpfsDaemonError(f"IPFS daemon (pid {pid}) survived SIGKILL; see {state_dir / 'ipfs.log'}")
    (state_dir / "ipfs.pid").unlink()
    # js-ipfs locks its repo with a directory that a killed daemon leaves behind (Kubo's lock is a file).
    shutil.rmtree(state_dir / "ipfs-repo" / "repo.lock", ignore_errors=True)
    return stopped
