"""Adapter files: canonical safetensors bytes in and out (never pickle), and export as a peft adapter directory."""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from fednode.settings import LoraSettings, PromptSettings

if TYPE_CHECKING:
    from fednode.model import BaseModel

METADATA_KEY = "__metadata__"
ALIGNMENT = 8


def le_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as contiguous little-endian bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.view(-1, flat.element_size()).flip(1)
    return raw.numpy().tobytes()


class AdapterError(ValueError):
    """An adapter file is unusable; `reason` is "too_large", "not_safetensors" or "bad_metadata"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def pack_adapter(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Canonical safetensors bytes: sorted compact JSON header padded with spaces to 8 bytes, float32
    little-endian data in sorted-name order. The same weights and metadata always give the same bytes."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterError("bad_metadata", "adapter metadata keys and values must all be strings")
    if not state or not all(isinstance(name, str) and name and name != METADATA_KEY for name in state):
        raise AdapterError("not_safetensors", "an adapter needs at least one tensor, each with a non-empty name")
    header: dict[str, object] = {METADATA_KEY: dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32)
        chunks.append(le_bytes(tensor))
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(chunks[-1])]}
        offset += len(chunks[-1])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def unpack_adapter(data: bytes, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse adapter bytes without executing anything; the size limit is checked before parsing."""
    if len(data) > max_bytes:
        raise AdapterError("too_large", f"adapter is {len(data)} bytes, over the {max_bytes}-byte limit")
    header = _header(data)
    try:
        state = load_safetensors(bytes(data))
    except SafetensorError as exc:
        raise AdapterError("not_safetensors", f"not a valid safetensors file: {exc}") from None
    metadata = header.get(METADATA_KEY)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError("bad_metadata", "adapter header lacks a string-valued __metadata__ table")
    return state, metadata


def _header(data: bytes) -> dict:
    """The JSON header of a safetensors file; duplicate keys are refused (parsers would disagree on them)."""
    if len(data) < 8:
        raise AdapterError("not_safetensors", f"{len(data)} bytes is too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise AdapterError("not_safetensors", "not a safetensors file: header length exceeds the file")

    def unique(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys")
        return dict(pairs)

    try:
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"), object_pairs_hook=unique)
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise AdapterError("not_safetensors", f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError("not_safetensors", "not a safetensors file: header is not a JSON object")
    return header


def export_peft(state: Mapping[str, torch.Tensor], base: BaseModel, adapter: LoraSettings | PromptSettings,
                out_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors loadable by `PeftModel.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = adapter.peft_config()
    config.base_model_name_or_path = base.name
    config.save_pretrained(out_dir)
    metadata = {"format": "pt", "fedchain.base_model": base.digest}
    (out_dir / "adapter_model.safetensors").write_bytes(pack_adapter(state, metadata))


def tensor_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm, accumulated in float64 in sorted-name order."""
    total = 0.0
    for name in sorted(state):
        total += float(state[name].detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)
