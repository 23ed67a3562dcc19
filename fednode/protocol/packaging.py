"""Packaging: adapters as canonical safetensors bytes (never pickle), with the metadata that binds an update or a
global adapter to its federation, round, sender and base model.

The writer is our own because a CID must not depend on a library's layout choices: sorted compact JSON header,
float32 little-endian data in sorted-name order. Parsing goes through safetensors itself, size-checked first."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..canonical import le_bytes
from ..flat import concat
from ..storage.cid import cid_of

if TYPE_CHECKING:
    from .rules import FederationRules

METADATA_KEY = "__metadata__"
# the dtypes a file keeps (any other float is written as float32): float32 adapters, the encodings'
# (fednode.protocol.encoding) float16 / bfloat16 / int8 values and int32 indices, masked updates' int64
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.int32: "I32",
          torch.int64: "I64"}
ALIGNMENT = 8
SERVER_STATE_KEY = "fedchain.server_state"   # global adapter metadata: CID of the server optimizer state
SHARES_KEY = "fedchain.secagg.shares"        # masked update metadata: CID of its share document ...
WEIGHT_KEY = "fedchain.secagg.weight"        # ... and the merge weight its quantized deltas were multiplied by


class AdapterError(ValueError):
    """An adapter file is unusable; `reason` is "too_large", "not_safetensors" or "bad_metadata"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def pack_adapter(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Canonical safetensors bytes: sorted compact JSON header padded with spaces to 8 bytes, little-endian data in
    sorted-name order, float32 unless the tensor is of another kept dtype (DTYPES). The same weights and metadata
    always give the same bytes."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterError("bad_metadata", "adapter metadata keys and values must all be strings")
    if not state or not all(isinstance(name, str) and name and name != METADATA_KEY for name in state):
        raise AdapterError("not_safetensors", "an adapter needs at least one tensor, each with a non-empty name")
    header: dict[str, object] = {METADATA_KEY: dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(state):
        dtype = state[name].dtype if state[name].dtype in DTYPES else torch.float32
        tensor = state[name].detach().to("cpu", dtype)
        chunks.append(le_bytes(tensor))
        header[name] = {"dtype": DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(chunks[-1])]}
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
    return concat(state), metadata


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


def adapter_metadata(federation_id: str, round_id: int, node: str, base_model: str, lora: dict,
                     kind: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"fedchain.federation": federation_id, "fedchain.round": str(round_id), "fedchain.node": node,
            "fedchain.base_model": base_model, "fedchain.peft_config": json.dumps(lora, sort_keys=True),
            "fedchain.kind": kind, **(extra or {})}


def pack_global(federation_id: str, round_id: int, node: str, rules: FederationRules, state: dict,
                server_state: dict | None = None) -> tuple[bytes, bytes | None]:
    """Canonical bytes of a round's global adapter and of the server optimizer state it records (None for a
    stateless rule). The state is its own file (kind "server_state", naming its rule); the adapter's metadata
    holds its CID, so the adapter's on-chain sha256 commits to it."""
    if server_state is None:
        extra, state_data = None, None
    else:
        state_data = pack_adapter(server_state, adapter_metadata(
            federation_id, round_id, node, rules.base_model, rules.lora, "server_state",
            {"fedchain.aggregation": rules.aggregation}))
        extra = {SERVER_STATE_KEY: cid_of(state_data)}
    meta = adapter_metadata(federation_id, round_id, node, rules.base_model, rules.lora, "global", extra)
    return pack_adapter(state, meta), state_data
