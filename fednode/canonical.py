"""Canonical encodings that digests are taken over: the same value always gives the same bytes.

Written by hand because a digest (on-chain, in a CID, in a model identity) must not depend on a library's
formatting defaults: JSON with sorted keys and no whitespace, tensors as contiguous little-endian bytes."""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def canonical_json(value) -> bytes:
    """Compact JSON, keys sorted, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def le_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as contiguous little-endian bytes."""
    return bytes(le_view(tensor))


def le_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as contiguous little-endian bytes: a view of its own memory when it already is a
    contiguous CPU tensor on a little-endian machine (no copy), else of a converted copy."""
    import torch  # here, not at the top: canonical JSON (rules, configs) must import without torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.view(-1, flat.element_size()).flip(1).contiguous()
    return memoryview(raw.numpy()).cast("B")
