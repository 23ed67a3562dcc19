"""Update encodings: how an update's tensors travel. An encoded update carries its delta from the round's start
adapter, cast to float16 / bfloat16, or quantized to int8 in blocks of `block_size` elements with one float32
scale per block (scale = max |delta| / 127, values round(delta / scale)); optionally only the `top_k` fraction of
each tensor's largest |delta| entries, with their int32 indices. The scales and the indices of all tensors travel
as one tensor each (`__scales__`, `__indices__`, in sorted-name order; each tensor's share follows from its
shape), so the file's header stays as small as a float32 adapter's. Encoding and decoding are elementwise IEEE
operations on the CPU and a stable sort, so the same weights always give the same bytes, and any machine decodes
the bytes to the same float64 adapter (start + delta) that verification, the merge and the audit use. Written by
hand for that reason: a quantization library's rounding and block layout are not part of any specification."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from ..tables import from_table

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
SCALES, INDICES = "__scales__", "__indices__"  # the int8 scales and top-k indices of every tensor, concatenated
METADATA_KEY = "fedchain.encoding"      # an encoded update's metadata: its encoding, as canonical JSON


class EncodingError(ValueError):
    """Encoding parameters, or encoded tensors, that do not fit the rules."""


@dataclass(frozen=True)
class UpdateEncoding:
    """The rules' `encoding` table."""

    dtype: str = "float32"   # float32 | float16 | bfloat16 | int8 (blockwise, per-block float32 scales)
    block_size: int = 128    # int8: elements per scale
    top_k: float = 0.0       # > 0: only this fraction of each tensor's largest |delta| entries is sent; 0 = dense

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise EncodingError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise EncodingError(f"block_size must be a whole number >= 1, got {self.block_size!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)) or not 0 <= self.top_k < 1:
            raise EncodingError(f"top_k must be in [0, 1), got {self.top_k!r}")

    @classmethod
    def from_rules(cls, table: dict) -> UpdateEncoding | None:
        """None for {} (plain float32 adapters, as before encodings existed)."""
        return from_table(cls, table, "encoding", EncodingError) if table != {} else None

    def to_json(self) -> dict:
        return asdict(self)

    def declared(self) -> str:
        """The encoding as an encoded update's metadata declares it (METADATA_KEY): canonical JSON."""
        return json.dumps(self.to_json(), sort_keys=True)

    def kept(self, numel: int) -> int:
        """How many entries of a tensor of `numel` travel."""
        return numel if not self.top_k else max(1, math.ceil(self.top_k * numel))

    def blocks(self, numel: int) -> int:
        """How many int8 scales a tensor of `numel` travels with."""
        return -(-self.kept(numel) // self.block_size)

    # ------------------------------------------------------------------ encode

    def encode(self, state: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors an update travels as: per adapter tensor its encoded delta, plus the scales and indices."""
        out, scales, indices = {}, [], []
        for key in sorted(start):
            delta = (state[key].to(torch.float64) - start[key].to(torch.float64)).reshape(-1)
            if self.top_k:
                index = _top_indices(delta, self.kept(delta.numel()))
                indices.append(index.to(torch.int32))
                delta = delta[index]
            if self.dtype == "int8":
                out[key], scale = _quantize(delta, self.block_size)
                scales.append(scale)
            else:
                out[key] = delta.to(DTYPES[self.dtype])
            if not self.top_k:
                out[key] = out[key].reshape(start[key].shape)
        if scales:
            out[SCALES] = torch.cat(scales)
        if indices:
            out[INDICES] = torch.cat(indices)
        return out

    # ------------------------------------------------------------------ decode

    def decode(self, tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """start + the decoded delta, float64, for every adapter tensor; EncodingError when the tensors do not fit
        this encoding (names, dtypes, shapes, finite non-negative scales, strictly increasing in-range indices)."""
        extra = ({SCALES} if self.dtype == "int8" else set()) | ({INDICES} if self.top_k else set())
        if set(tensors) != set(start) | extra:
            missing = sorted(set(start) | extra - set(tensors))[:2]
            unexpected = sorted(set(tensors) - set(start) - extra)[:2]
            raise EncodingError(f"tensor names differ from the {self.dtype} encoding's (missing {missing}, "
                                f"unexpected {unexpected})")
        keys = sorted(start)
        scales = _split(tensors.get(SCALES), SCALES, torch.float32, [self.blocks(start[k].numel()) for k in keys]) \
            if self.dtype == "int8" else {}
        indices = _split(tensors.get(INDICES), INDICES, torch.int32, [self.kept(start[k].numel()) for k in keys]) \
            if self.top_k else {}
        out = {}
        for i, key in enumerate(keys):
            numel, shape = start[key].numel(), start[key].shape
            values = tensors[key]
            want = (self.kept(numel),) if self.top_k else tuple(shape)
            if values.dtype != DTYPES[self.dtype] or tuple(values.shape) != want:
                raise EncodingError(f"{key}: {tuple(values.shape)} {values.dtype} != {want} {DTYPES[self.dtype]}")
            values = values.reshape(-1)
            delta = _dequantize(values, scales[i], self.block_size) if self.dtype == "int8" \
                else values.to(torch.float64)
            if self.top_k:
                index = indices[i].to(torch.int64)
                if int(index[0]) < 0 or int(index[-1]) >= numel or bool((index[1:] <= index[:-1]).any()):
                    raise EncodingError(f"{key}: its {INDICES} must increase strictly within [0, {numel})")
                dense = torch.zeros(numel, dtype=torch.float64)
                dense[index] = delta
                delta = dense
            out[key] = start[key].to(torch.float64) + delta.reshape(shape)
        return out


def _split(flat: torch.Tensor, name: str, dtype: torch.dtype, sizes: list[int]) -> list[torch.Tensor]:
    """A concatenated tensor cut into the parts of `sizes` (EncodingError when its dtype or length is wrong)."""
    if flat.dtype != dtype or tuple(flat.shape) != (sum(sizes),):
        raise EncodingError(f"{name}: {tuple(flat.shape)} {flat.dtype} != ({sum(sizes)},) {dtype}")
    if dtype.is_floating_point and (not bool(torch.isfinite(flat).all()) or bool((flat < 0).any())):
        raise EncodingError(f"{name}: scales must be finite and >= 0")
    return list(torch.split(flat, sizes))


def _top_indices(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest |delta| (ties: the lower index first), in increasing order."""
    order = torch.sort(-delta.abs(), stable=True).indices[:k]
    return torch.sort(order).values


def _quantize(delta: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 per-block scales (scale = max |x| / 127 of the block, 0 for an all-zero block)."""
    n = delta.numel()
    padded = torch.zeros(-(-n // block) * block, dtype=torch.float64)
    padded[:n] = delta
    blocks = padded.reshape(-1, block)
    scale = (blocks.abs().amax(dim=1) / 127).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
    values = torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[:n]
    return values, scale


def _dequantize(values: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return values.to(torch.float64) * scale.to(torch.float64).repeat_interleave(block)[:values.numel()]
