"""Start and stop a real local testnet: the anvil binary shipped by npm `@foundry-rs/anvil-linux-amd64`."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from chain.compiler import project_root

from . import daemon
from .daemon import post_json


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
    answer = post_json(url, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode(),
                       timeout, {"Content-Type": "application/json"})
    return answer is not None and "result" in answer


@dataclass(frozen=True)
class AnvilProcess:
    pid: int
    url: str
    state_dir: Path


def start(state_dir: Path, port: int = 8545, block_time: float | None = None,
          timeout: float = 30.0, persist: bool = True) -> AnvilProcess:
    """Start anvil on 127.0.0.1:port in the background, its chain state kept in state_dir (survives a restart;
    `persist=False`: in memory only, no periodic state dumps, for benchmarks), log in state_dir/anvil.log, pid in
    state_dir/anvil.pid. Returns once it answers eth_chainId."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    if rpc_ready(url):
        raise AnvilError(f"something already answers JSON-RPC at {url}; stop it or pick another port")
    args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port)]
    if persist:
        args += ["--state", str(state_dir / "anvil-state.json"), "--state-interval", "5"]
    if block_time:
        args += ["--block-time", str(block_time)]
    try:
        pid = daemon.spawn("anvil", args, state_dir, lambda: rpc_ready(url), timeout)
    except daemon.DaemonError as exc:
        raise AnvilError(str(exc)) from None
    return AnvilProcess(pid, url, state_dir)


def stop(state_dir: Path, timeout: float = 10.0) -> bool:
    """Stop the anvil whose pid is in state_dir/anvil.pid. False if none was running."""
    return daemon.stop("anvil", state_dir, timeout)
