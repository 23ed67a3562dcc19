"""The local stack: a real anvil and a real IPFS node on 127.0.0.1, started and stopped together."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import anvil, ipfs


BLOCK_TIME = 1.0  # seconds between anvil's blocks: its clock moves on without transactions, as a real chain's does


@dataclass(frozen=True)
class Stack:
    rpc: str
    ipfs_api: str
    ipfs_kind: str
    anvil_pid: int
    ipfs_pid: int
    state_dir: str
    startup_seconds: dict
    block_time: float

    @staticmethod
    def record(state_dir: Path) -> Path:
        return Path(state_dir) / "stack.json"


def up(state_dir: Path, anvil_port: int = 8545, ipfs_port: int = 5001, block_time: float = BLOCK_TIME,
       log=print) -> Stack:
    """Start both services (health-checked), or fail and leave nothing running. anvil mines a block every
    `block_time` seconds (0: only when a transaction arrives)."""
    state_dir = Path(state_dir)
    t0 = time.perf_counter()
    chain = anvil.start(state_dir, port=anvil_port, block_time=block_time or None)
    t1 = time.perf_counter()
    log(f"anvil      {chain.url}  pid {chain.pid}  ({t1 - t0:.1f} s; log {state_dir / 'anvil.log'})")
    try:
        node = ipfs.start(state_dir, api_port=ipfs_port)
    except Exception:
        anvil.stop(state_dir)
        raise
    t2 = time.perf_counter()
    log(f"ipfs       {node.api_url}  pid {node.pid}  {node.kind}  ({t2 - t1:.1f} s; log {state_dir / 'ipfs.log'})")
    stack = Stack(chain.url, node.api_url, node.kind, chain.pid, node.pid, str(state_dir.resolve()),
                  {"anvil": round(t1 - t0, 3), "ipfs": round(t2 - t1, 3), "total": round(t2 - t0, 3)}, block_time)
    Stack.record(state_dir).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    return stack


def down(state_dir: Path, log=print) -> None:
    for name, stop in (("ipfs", ipfs.stop), ("anvil", anvil.stop)):
        log(f"{name:<10} {'stopped' if stop(Path(state_dir)) else 'was not running'}")
    Stack.record(state_dir).unlink(missing_ok=True)


def status(state_dir: Path) -> dict[str, bool]:
    record = Stack.record(state_dir)
    if not record.is_file():
        return {"anvil": False, "ipfs": False}
    stack = json.loads(record.read_text())
    return {"anvil": anvil.rpc_ready(stack["rpc"]), "ipfs": ipfs.api_ready(stack["ipfs_api"])}
