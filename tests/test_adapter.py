"""Canonical adapter packing and safe unpacking (no model needed)."""
from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from fednode.protocol.packaging import (
    AdapterError,
    pack_adapter,
    unpack_adapter,
)

LIMIT = 1 << 20
META = {"fedchain.round": "3", "fedchain.node": "0xabc", "fedchain.base_model": "ab" * 32,
        "fedchain.peft_config": '{"r": 8}', "fedchain.federation": "fed-1"}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    names = [f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
             for i in range(2) for m in "qv" for ab in "AB"]
    return {n: torch.randn((8, 16) if "lora_A" in n else (16, 8), generator=gen) for n in names}


class _Exploit:
    """Unpickling this creates a directory: proof that a loader executed the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_round_trip_is_exact():
    state = _state()
    got, meta = unpack_adapter(pack_adapter(state, META), LIMIT)
    assert meta == META
    assert sorted(got) == sorted(state)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], state[k]) for k in state)


def test_packing_is_canonical():
    state = _state()
    data = pack_adapter(state, META)
    shuffled_state = dict(reversed(list(state.items())))
    shuffled_meta = dict(reversed(list(META.items())))
    assert pack_adapter(shuffled_state, shuffled_meta) == data
    assert pack_adapter({k: v.clone() for k, v in state.items()}, dict(META)) == data
    assert pack_adapter(*unpack_adapter(data, LIMIT)) == data  # a re-pack reproduces the file byte for byte
    assert pack_adapter({k: v.double() for k, v in state.items()}, META) == data  # stored as float32
    assert pack_adapter(_state(1), META) != data
    assert pack_adapter(state, {**META, "fedchain.round": "4"}) != data


def test_layout_is_sorted_aligned_and_readable_by_safetensors(tmp_path):
    data = pack_adapter(_state(), META)
    size = int.from_bytes(data[:8], "little")
    assert (8 + size) % 8 == 0
    header_text = data[8:8 + size].decode()
    header = json.loads(header_text)
    assert header_text.rstrip(" ") == json.dumps(header, sort_keys=True, separators=(",", ":"))
    names = sorted(k for k in header if k != "__metadata__")
    offsets = [header[n]["data_offsets"] for n in names]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    assert offsets[-1][1] == len(data) - 8 - size
    assert {header[n]["dtype"] for n in names} == {"F32"}
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == META
        assert torch.equal(f.get_tensor(names[0]), _state()[names[0]])


def test_non_string_metadata_is_refused():
    with pytest.raises(AdapterError, match="strings") as info:
        pack_adapter(_state(), {"fedchain.round": 3})
    assert info.value.reason == "bad_metadata"


def test_a_pickle_is_rejected_without_being_unpickled(tmp_path):
    marker = tmp_path / "executed"
    payloads = [pickle.dumps({"w": _Exploit(str(marker))})]
    for zipped in (True, False):
        buf = io.BytesIO()
        torch.save({"w": _Exploit(str(marker)), **_state()}, buf, _use_new_zipfile_serialization=zipped)
        payloads.append(buf.getvalue())
    for data in payloads:
        with pytest.raises(AdapterError) as info:
            unpack_adapter(data, LIMIT)
        assert info.value.reason == "not_safetensors"
    assert not marker.exists()


@pytest.mark.parametrize("size", [0, 7, 8, 100, 5000])
def test_random_bytes_are_not_safetensors(size):
    data = random.Random(size).randbytes(size)
    with pytest.raises(AdapterError) as info:
        unpack_adapter(data, LIMIT)
    assert info.value.reason == "not_safetensors"


@pytest.mark.parametrize("header", [b"[]", b'{"a": 1', b'{"__metadata__": {}, "__metadata__": {}}', b"\xff\xfe{}"])
def test_malformed_headers_are_not_safetensors(header):
    header += b" " * (-len(header) % 8)
    with pytest.raises(AdapterError) as info:
        unpack_adapter(len(header).to_bytes(8, "little") + header, LIMIT)
    assert info.value.reason == "not_safetensors"


def test_truncated_file_is_not_safetensors():
    data = pack_adapter(_state(), META)
    with pytest.raises(AdapterError) as info:
        unpack_adapter(data[:-4], LIMIT)
    assert info.value.reason == "not_safetensors"


def test_oversized_is_rejected_before_parsing():
    junk = b"\x00" * (LIMIT + 1)  # would be "not_safetensors" if it were parsed
    with pytest.raises(AdapterError, match="limit") as info:
        unpack_adapter(junk, LIMIT)
    assert info.value.reason == "too_large"
    data = pack_adapter(_state(), META)
    with pytest.raises(AdapterError) as info:
        unpack_adapter(data, len(data) - 1)
    assert info.value.reason == "too_large"
    assert unpack_adapter(data, len(data))[1] == META


def test_missing_metadata_is_bad_metadata():
    with pytest.raises(AdapterError, match="__metadata__") as info:
        unpack_adapter(safetensors_save(_state()), LIMIT)
    assert info.value.reason == "bad_metadata"


def test_non_string_metadata_in_a_file_is_refused_by_the_parser():
    tensor = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    header = json.dumps({"__metadata__": {"fedchain.round": 3}, "x": tensor})
    header += " " * (-len(header) % 8)
    with pytest.raises(AdapterError) as info:
        unpack_adapter(len(header).to_bytes(8, "little") + header.encode() + bytes(4), LIMIT)
    assert info.value.reason == "not_safetensors"


def _file(entries: dict, data: bytes) -> bytes:
    header = json.dumps({"__metadata__": META, **entries})
    header += " " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header.encode() + data


@pytest.mark.parametrize("entries, size", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),           # overlapping tensors
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, 16),          # a gap
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),             # offsets not the shape's
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12),            # trailing bytes
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8),              # unknown dtype
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8),            # negative dimension
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8),             # shape not a list
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, 8), # unknown field
    ({}, 0),                                                                        # no tensor
])
def test_inconsistent_tensor_tables_are_not_safetensors(entries, size):
    """The reader checks what safetensors' own parser checks before it copies a byte out."""
    with pytest.raises(AdapterError) as info:
        unpack_adapter(_file(entries, bytes(size)), LIMIT)
    assert info.value.reason == "not_safetensors"


def test_reader_agrees_with_safetensors_on_files_it_did_not_write():
    """A file written by safetensors itself (mixed dtypes, its own data order) reads back the same tensors, each
    writable and owning its memory (not a view of the file's bytes)."""
    state = {"z.w": torch.randn(3, 5), "a.idx": torch.arange(7, dtype=torch.int32),
             "m.q": torch.randint(-128, 127, (9,), dtype=torch.int8), "b.h": torch.randn(4).to(torch.bfloat16)}
    data = safetensors_save(state, metadata=META)
    read, meta = unpack_adapter(data, LIMIT)
    assert meta == META and list(read) == sorted(state)
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
        read[name].zero_()  # writable, and not the file's memory
    assert torch.equal(unpack_adapter(data, LIMIT)[0]["z.w"], state["z.w"])
