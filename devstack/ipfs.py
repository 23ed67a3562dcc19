"""Start and stop a real local IPFS node: Kubo (``ipfs`` on PATH) if present, else js-ipfs from npm ``ipfs``.

The node is private: HTTP RPC API on 127.0.0.1 only, no gateway, no MDNS, no DHT (Kubo's and js-ipfs's ``test``
profile, routing off). By default it is offline (no swarm listener, no peers). Given a swarm port it listens on
127.0.0.1 only and keeps connected to the peers it is given (its bootstrap list, redialled when lost): a
``cat`` of a CID it lacks is then answered over bitswap by whichever peer holds it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
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
    swarm: str | None = None  # /ip4/127.0.0.1/tcp/PORT/p2p/ID when networked, None when offline

    @property
    def pid_file(self) -> Path:
        return daemon.pid_file(self.state_dir, "ipfs")


def _configure(repo: Path, api_port: int, swarm_port: int | None, peers: list[str]) -> None:
    """Point the repo's API at 127.0.0.1:api_port, its swarm at 127.0.0.1:swarm_port (none if None) and its
    bootstrap list at `peers`; no gateway, DHT or js-ipfs gRPC port."""
    path = repo / "config"
    config = json.loads(path.read_text())
    addresses = config["Addresses"]
    swarm = [] if swarm_port is None else [f"/ip4/127.0.0.1/tcp/{swarm_port}"]
    addresses.update(API=f"/ip4/127.0.0.1/tcp/{api_port}", Gateway=[], Swarm=swarm)
    addresses.pop("RPC", None)  # js-ipfs's gRPC server (fixed port 5003) starts only if this is set
    config["Bootstrap"] = list(peers)
    config.setdefault("Routing", {})["Type"] = "none"  # peers come from the bootstrap list, wants go to them all
    path.write_text(json.dumps(config, indent=2))


def init(state_dir: Path, timeout: float = 60.0) -> str:
    """Create the repo state_dir/ipfs-repo (``test`` profile) unless it exists; return its peer ID."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    repo = state_dir / "ipfs-repo"
    if not (repo / "config").is_file():
        kind, command = ipfs_command()
        log_path = state_dir / "ipfs.log"
        with open(log_path, "ab") as log:
            try:
                done = subprocess.run([*command, "init", "--profile", "test", "--empty-repo"], check=False,
                                      env=_env(repo), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                raise IpfsDaemonError(f"`{kind} init` took over {timeout:.0f} s; see {log_path}") from None
        if done.returncode:
            raise IpfsDaemonError(f"`{kind} init` failed with code {done.returncode}; see {log_path}")
    return json.loads((repo / "config").read_text())["Identity"]["PeerID"]


def _env(repo: Path) -> dict:
    return {**os.environ, "IPFS_PATH": str(repo), "NO_UPDATE_NOTIFIER": "1"}  # js-ipfs's CLI polls npm weekly


def start(state_dir: Path, api_port: int = 5001, timeout: float = 60.0, swarm_port: int | None = None,
          peers: list[str] = ()) -> IpfsProcess:
    """Start an IPFS daemon with its API on 127.0.0.1:api_port, repo in state_dir/ipfs-repo (:func:`init`;
    survives a restart), log in state_dir/ipfs.log, pid in state_dir/ipfs.pid. Offline unless `swarm_port` is
    given; then it listens on 127.0.0.1:swarm_port and dials `peers` (``/ip4/.../tcp/P/p2p/ID``). Returns once it
    answers /api/v0/version."""
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
    peer_id = init(state_dir, timeout)
    repo = state_dir / "ipfs-repo"
    _configure(repo, api_port, swarm_port, list(peers) if swarm_port is not None else [])
    args = ["daemon"] + (["--offline"] if swarm_port is None else []) \
        + (["--enable-preload=false"] if kind == "js-ipfs" else [])
    try:
        pid = daemon.spawn("ipfs", [*command, *args], state_dir, lambda: api_ready(api_url), timeout, _env(repo))
    except daemon.DaemonError as exc:
        raise IpfsDaemonError(f"{kind} {exc}") from None
    swarm = None if swarm_port is None else f"/ip4/127.0.0.1/tcp/{swarm_port}/p2p/{peer_id}"
    return IpfsProcess(pid, api_url, f"/ip4/127.0.0.1/tcp/{api_port}/http", kind, state_dir, swarm)


def swarm_peers(api_url: str, timeout: float = 5.0) -> set[str]:
    """The peer IDs the node at api_url is connected to (empty if it does not answer)."""
    answer = post_json(f"{api_url}/api/v0/swarm/peers", b"", timeout) or {}
    return {peer["Peer"] for peer in answer.get("Peers") or []}


def connect(api_url: str, peers: list[str], timeout: float = 30.0) -> float:
    """Have the node at api_url dial each of `peers` (``/ip4/.../tcp/P/p2p/ID``) until it is connected to them all;
    the seconds that took."""
    started = time.monotonic()
    wanted = {address.rsplit("/p2p/", 1)[1] for address in peers}
    while missing := wanted - swarm_peers(api_url):
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            raise IpfsDaemonError(f"the IPFS node at {api_url} could not connect to {', '.join(sorted(missing))} "
                                  f"within {timeout:.0f} s")
        for address in peers:
            if address.rsplit("/p2p/", 1)[1] in missing:
                post_json(f"{api_url}/api/v0/swarm/connect?arg={urllib.parse.quote(address)}", b"", max(left, 0.5))
        time.sleep(0.2)
    return time.monotonic() - started


def stop(state_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the daemon whose pid is in state_dir/ipfs.pid. False if none was running."""
    try:
        stopped = daemon.stop("ipfs", state_dir, timeout)
    except daemon.DaemonError as exc:
        raise IpfsDaemonError(str(exc)) from None
    # js-ipfs locks its repo with a directory that a killed daemon leaves behind (Kubo's lock is a file).
    shutil.rmtree(Path(state_dir) / "ipfs-repo" / "repo.lock", ignore_errors=True)
    return stopped
