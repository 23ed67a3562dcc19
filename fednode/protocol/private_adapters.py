"""A hospital's private adapter (personalized rules): kept beside the node, one canonical file per round, never
published. Files are written atomically, so a node killed mid-round resumes from its last completed round."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..storage import write_atomic
from .packaging import AdapterError, pack_adapter, unpack_adapter

MAX_BYTES = 1 << 30


class PrivateAdapterError(RuntimeError):
    """A saved private adapter cannot be read back."""


class PrivateAdapters:
    """The private adapter after each round, in `folder/<federation>/<node>/round-<n>.safetensors` (in memory
    when `folder` is None)."""

    def __init__(self, folder: Path | None, federation_id: str, node: str):
        self.folder = None if folder is None else Path(folder) / re.sub(r"[^0-9A-Za-z]+", "-", federation_id) \
            / node.lower()
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._meta = {"fedchain.federation": federation_id, "fedchain.node": node, "fedchain.kind": "private"}

    def save(self, round_id: int, state: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            self._memory[round_id] = dict(state)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / f"round-{round_id}.safetensors",
                     pack_adapter(state, {**self._meta, "fedchain.round": str(round_id)}))

    def rounds(self) -> list[int]:
        if self.folder is None:
            return sorted(self._memory)
        found = (re.fullmatch(r"round-(\d+)\.safetensors", p.name) for p in self.folder.glob("round-*.safetensors"))
        return sorted(int(m.group(1)) for m in found if m)

    def latest_before(self, round_id: int) -> dict[str, torch.Tensor] | None:
        """The private adapter saved by the newest round before `round_id`, None if there is none."""
        earlier = [r for r in self.rounds() if r < round_id]
        if not earlier:
            return None
        if self.folder is None:
            return self._memory[earlier[-1]]
        path = self.folder / f"round-{earlier[-1]}.safetensors"
        try:
            state, _ = unpack_adapter(path.read_bytes(), MAX_BYTES)
        except (OSError, AdapterError) as exc:
            raise PrivateAdapterError(f"private adapter {path}: {exc}") from None
        return state
