"""Packaging: adapters as canonical safetensors bytes (never pickle), with the metadata that binds an update or a
global adapter to its federation, round, sender and base model.

The writer is our own because a CID must not depend on a library's layout choices: sorted compact JSON header,
float32 little-endian data in sorted-name order. The reader is our own too, checking what safetensors checks: its
loader copies every tensor out of the file, and the merge's flat buffer would be a second copy, which matters for
full-parameter updates of hundreds of MB; ours copies the file's data once, into that flat buffer."""
from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..canonical import le_view
from ..flat import Layout
from ..storage.cid import cid_of

if TYPE_CHECKING:
    from .rules import FederationRules

METADATA_KEY = "__metadata__"
# the dtypes a file keeps (any other float is written as float32): float32 adapters, the encodings'
# (fednode.protocol.encoding) float16 / bfloat16 / int8 values and int32 indices, masked updates' int64
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.int32: "I32",
          torch.int64: "I64"}
# every dtype a safetensors file may hold that torch has (the verifier refuses those an update must not have)
READ_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
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
    chunks: list[memoryview] = []  # views of the tensors' own memory where possible: the join is the one copy
    offset = 0
    for name in sorted(state):
        dtype = state[name].dtype if state[name].dtype in DTYPES else torch.float32
        tensor = state[name].detach().to("cpu", dtype)
        chunks.append(le_view(tensor))
        header[name] = {"dtype": DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(chunks[-1])]}
        offset += len(chunks[-1])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    return b"".join([len(encoded).to_bytes(8, "little"), encoded, *chunks])


def unpack_adapter(data: bytes, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse adapter bytes without executing anything; the size limit is checked before parsing."""
    if len(data) > max_bytes:
        raise AdapterError("too_large", f"adapter is {len(data)} bytes, over the {max_bytes}-byte limit")
    header = _header(data)
    state = _tensors(data, header, 8 + int.from_bytes(data[:8], "little"))
    if METADATA_KEY not in header:
        raise AdapterError("bad_metadata", "adapter header lacks a string-valued __metadata__ table")
    return state, header[METADATA_KEY]


def _tensors(data: bytes, header: dict, start: int) -> dict[str, torch.Tensor]:
    """The header's tensors, checked as safetensors checks them (string-valued metadata, a known dtype, a shape
    of ints >= 0, offsets that match it, the entries tiling the data section from `start` exactly), in sorted-name
    order. The data is copied once: into one buffer the tensors are views of when they share a dtype and lie in
    name order (as `flat.concat` leaves them, and as `pack_adapter` writes them), else into one buffer each."""
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError("not_safetensors", "not a valid safetensors file: __metadata__ must map strings to strings")
    entries = {k: v for k, v in header.items() if k != METADATA_KEY}
    spans = []
    for name, entry in entries.items():
        ok = (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
              and entry["dtype"] in READ_DTYPES and isinstance(entry["shape"], list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
              and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"]))
        if not ok:
            raise AdapterError("not_safetensors", f"not a valid safetensors file: bad header entry for {name!r:.80}")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * READ_DTYPES[entry["dtype"]].itemsize:
            raise AdapterError("not_safetensors", f"not a valid safetensors file: {name!r:.80}'s offsets do not "
                                                  f"match its shape and dtype")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise AdapterError("not_safetensors", "not a valid safetensors file: tensor data overlaps or has gaps")
        position = end
    if start + position != len(data):
        raise AdapterError("not_safetensors", f"not a valid safetensors file: the tensors cover {position} bytes of "
                                              f"a {len(data) - start}-byte data section")
    if not entries:
        raise AdapterError("not_safetensors", "an adapter needs at least one tensor")
    names = sorted(entries)
    dtypes = {entries[n]["dtype"] for n in names}
    in_order = [entries[n]["data_offsets"][0] for n in names] == sorted(b for b, _ in spans)
    if len(dtypes) == 1 and in_order:
        dtype = READ_DTYPES[dtypes.pop()]
        flat = _copy_out(data, start, position, dtype)
        return Layout.of({n: torch.empty(entries[n]["shape"], device="meta") for n in names}).view(flat)
    return {n: _copy_out(data, start + entries[n]["data_offsets"][0], entries[n]["data_offsets"][1]
                         - entries[n]["data_offsets"][0], READ_DTYPES[entries[n]["dtype"]])
            .view(entries[n]["shape"]) for n in names}


def _copy_out(data: bytes, offset: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """`size` little-endian bytes of `data` from `offset` as a new 1-D tensor of `dtype` (one copy)."""
    if size == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # the buffer is read-only: it is copied at once
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).clone()
    if sys.byteorder == "big" and dtype.itemsize > 1:
        raw = raw.view(-1, dtype.itemsize).flip(1).reshape(-1)
    return raw.view(dtype)


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
