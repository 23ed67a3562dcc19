"""`fedchain init DIR`: an example federation on the local stack, one config per participant (an admin, an
aggregator, N hospitals), every key shown with its default and meaning (`reference.toml_file`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .reference import toml_file

ROUNDS = 2   # a first federation that finishes in a few minutes on the tiny model


@dataclass(frozen=True)
class Scaffold:
    """The files `init` wrote, by participant name."""
    folder: Path
    configs: dict[str, Path]


RPC, IPFS = "http://127.0.0.1:8545", "http://127.0.0.1:5001"   # `fedchain stack up`'s defaults


def participant_values(name: str, client: int, hospitals: int, rpc: str, ipfs: str) -> dict[str, dict]:
    """The keys set in a participant's file (the rest keep their defaults)."""
    return {"chain": {"rpc": rpc, "deployment": "deployment.json"},
            "storage": {"ipfs": ipfs},
            "wallet": {"keystore": f"keys/{name}.json"},
            "data": {"num_clients": hospitals, "client": client},
            "train": {"steps": 30},
            "federation": {"rounds": ROUNDS, "min_updates": hospitals, "round_seconds": 600}}


def init_federation(folder: Path, hospitals: int = 3, rpc: str = RPC, ipfs: str = IPFS) -> Scaffold:
    """Write admin.toml, aggregator.toml and hospital-<i>.toml into `folder` (never over an existing file)."""
    if hospitals < 1:
        raise ValueError(f"--hospitals must be at least 1, got {hospitals}")
    folder = Path(folder)
    roles = {"admin": ("the admin: deploys the contract, approves hospitals", 0),
             "aggregator": ("the aggregator: opens rounds, verifies, merges, finalizes", 0),
             **{f"hospital-{i}": (f"hospital {i}: trains on data partition {i} of {hospitals}", i)
                for i in range(hospitals)}}
    paths = {name: folder / f"{name}.toml" for name in roles}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise ValueError(f"{existing[0]} already exists; not overwriting a config (choose another folder)")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (title, client) in roles.items():
        paths[name].write_text(toml_file(f"{name}.toml: {title}", participant_values(name, client, hospitals, rpc, ipfs)))
        load_config(paths[name])  # what init writes always loads
    return Scaffold(folder, paths)
