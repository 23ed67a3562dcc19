"""Start and stop a real local IPFS node: Kubo (``ipfs`` on PATH) if present, else js-ipfs from npm ``ipfs``.

The node is offline and private: HTTP RPC API on 127.0.0.1 only, no gateway, no swarm listeners,
no bootstrap peers, no MDNS (Kubo's and js-ipfs's ``test`` profile).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from chain.compiler import project_root

from . import daemon
from .daemon import post_json


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
    answer = post_json(f"{api_url}/api/v0/version", b"", timeout)
    return answer is not None and "Version" in answer


@dataclass(frozen=True)
class IpfsProcess:
    pid: int
    api_url: str
    multiaddr: str
    kind: str  # "kubo" or "js-ipfs"
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return daemon.pid_file(self.state_dir, "ipfs")


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
    pid = daemon.recorded_pid(state_dir, "ipfs")
    if pid and daemon.alive(pid):
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
    args = ["daemon", "--offline"] + (["--enable-preload=false"] if kind == "js-ipfs" else [])
    try:
        pid = daemon.spawn("ipfs", [*command, *args], state_dir, lambda: api_ready(api_url), timeout, env)
    except daemon.DaemonError as exc:
        raise IpfsDaemonError(f"{kind} {exc}") from None
    return IpfsProcess(pid, api_url, f"/ip4/127.0.0.1/tcp/{api_port}/http", kind, state_dir)


def stop(state_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the daemon whose pid is in state_dir/ipfs.pid. False if none was running."""
    try:
        stopped = daemon.stop("ipfs", state_dir, timeout)
    except daemon.DaemonError as exc:
        raise IpfsDaemonError(str(exc)) from None
    # js-ipfs locks its repo with a directory that a killed daemon leaves behind (Kubo's lock is a file).
    shutil.rmtree(Path(state_dir) / "ipfs-repo" / "repo.lock", ignore_errors=True)
    return stopped
