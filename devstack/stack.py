"""The local stack: a real anvil and one or more real IPFS nodes on 127.0.0.1, started and stopped together."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import anvil, daemon, ipfs


BLOCK_TIME = 1.0  # seconds between anvil's blocks: its clock moves on without transactions, as a real chain's does
SWARM_PORT = 4001  # the first IPFS node's swarm port when there are several (node i: SWARM_PORT + i)


@dataclass(frozen=True)
class Stack:
    rpc: str
    ipfs_api: str  # the first IPFS node's
    ipfs_kind: str
    anvil_pid: int
    ipfs_pid: int
    state_dir: str
    startup_seconds: dict
    block_time: float
    ipfs_nodes: list = field(default_factory=list)  # one {api, swarm, pid, dir} per node

    @staticmethod
    def record(state_dir: Path) -> Path:
        return Path(state_dir) / "stack.json"


def node_dir(state_dir: Path, index: int) -> Path:
    """IPFS node `index`'s state folder: the stack's own for node 0 (as with one node), ipfs-<index>/ for the rest."""
    return Path(state_dir) if index == 0 else Path(state_dir) / f"ipfs-{index}"


def up(state_dir: Path, anvil_port: int = 8545, ipfs_port: int = 5001, block_time: float = BLOCK_TIME,
       log=print, ipfs_nodes: int = 1, swarm_port: int = SWARM_PORT) -> Stack:
    """Start anvil and `ipfs_nodes` IPFS nodes (health-checked), or fail and leave nothing running. anvil mines a
    block every `block_time` seconds (0: only when a transaction arrives). One IPFS node is offline; several
    (APIs on ipfs_port + i, swarms on swarm_port + i, all on 127.0.0.1) are each connected to all the others."""
    if ipfs_nodes < 1:
        raise ValueError(f"--ipfs-nodes must be at least 1, got {ipfs_nodes}")
    state_dir = Path(state_dir)
    t0 = time.perf_counter()
    chain = anvil.start(state_dir, port=anvil_port, block_time=block_time or None)
    t1 = time.perf_counter()
    log(f"anvil      {chain.url}  pid {chain.pid}  ({t1 - t0:.1f} s; log {state_dir / 'anvil.log'})")
    dirs = [node_dir(state_dir, i) for i in range(ipfs_nodes)]
    nodes: list[ipfs.IpfsProcess] = []
    try:
        networked = ipfs_nodes > 1
        swarms = []
        if networked:
            ids = [ipfs.init(d) for d in dirs]
            swarms = [f"/ip4/127.0.0.1/tcp/{swarm_port + i}/p2p/{peer}" for i, peer in enumerate(ids)]
        for i, folder in enumerate(dirs):
            started = time.perf_counter()
            node = ipfs.start(folder, api_port=ipfs_port + i, swarm_port=swarm_port + i if networked else None,
                              peers=[a for j, a in enumerate(swarms) if j != i])
            nodes.append(node)
            name = "ipfs" if i == 0 else f"ipfs-{i}"
            log(f"{name:<10} {node.api_url}  pid {node.pid}  {node.kind}  ({time.perf_counter() - started:.1f} s; "
                f"log {folder / 'ipfs.log'})")
        peering = time.perf_counter()
        for i, node in enumerate(nodes[:-1]):
            ipfs.connect(node.api_url, swarms[i + 1:])
        if networked:
            log(f"peered     {ipfs_nodes} IPFS nodes, each connected to the {ipfs_nodes - 1} others "
                f"({time.perf_counter() - peering:.1f} s)")
    except Exception:
        for folder in reversed(dirs):
            ipfs.stop(folder)
        anvil.stop(state_dir)
        raise
    t2 = time.perf_counter()
    first = nodes[0]
    stack = Stack(chain.url, first.api_url, first.kind, chain.pid, first.pid, str(state_dir.resolve()),
                  {"anvil": round(t1 - t0, 3), "ipfs": round(t2 - t1, 3), "total": round(t2 - t0, 3)}, block_time,
                  [{"api": n.api_url, "swarm": n.swarm, "pid": n.pid, "dir": str(n.state_dir.resolve())}
                   for n in nodes])
    Stack.record(state_dir).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    return stack


def down(state_dir: Path, log=print) -> None:
    state_dir = Path(state_dir)
    extra = sorted((p for p in state_dir.glob("ipfs-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]), reverse=True)
    for folder in extra:
        if daemon.recorded_pid(folder, "ipfs") is not None:
            log(f"{folder.name:<10} {'stopped' if ipfs.stop(folder) else 'was not running'}")
    for name, stop in (("ipfs", ipfs.stop), ("anvil", anvil.stop)):
        log(f"{name:<10} {'stopped' if stop(state_dir) else 'was not running'}")
    Stack.record(state_dir).unlink(missing_ok=True)


def status(state_dir: Path) -> dict[str, bool]:
    """Whether each service answers: anvil, ipfs (the first node), then ipfs-1, ... for further nodes."""
    record = Stack.record(state_dir)
    if not record.is_file():
        return {"anvil": False, "ipfs": False}
    stack = json.loads(record.read_text())
    health = {"anvil": anvil.rpc_ready(stack["rpc"]), "ipfs": ipfs.api_ready(stack["ipfs_api"])}
    for i, node in enumerate(stack.get("ipfs_nodes", [])[1:], start=1):
        health[f"ipfs-{i}"] = ipfs.api_ready(node["api"])
    return health
