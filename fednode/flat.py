"""A state's tensors as one contiguous buffer, in sorted-name order: elementwise float64 kernels then run once over
the whole adapter instead of once per tensor, with the same bits (every element goes through the same operations;
only the number of kernel calls changes)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

State = Mapping[str, torch.Tensor]
CHUNK = 1 << 16  # elements of a float64 block that stays in cache while every update is added into it


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a state lies in its flat buffer: names sorted, shapes, offsets."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, state: State) -> Layout:
        names = tuple(sorted(state))
        shapes = tuple(state[n].shape for n in names)
        offsets, size = [], 0
        for shape in shapes:
            offsets.append(size)
            size += shape.numel()
        return cls(names, shapes, tuple(offsets), size)

    def flatten(self, state: State, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The state's tensors in one buffer of `dtype`: a view when they already are consecutive slices of one
        buffer of that dtype (as `view` and `concat` leave them), one conversion of that buffer when they are
        of another dtype, else a copy tensor by tensor."""
        flat = contiguous_view(state, self)
        if flat is not None:
            return flat.to(dtype)
        out = torch.empty(self.size, dtype=dtype)
        for name, offset, shape in zip(self.names, self.offsets, self.shapes):
            out[offset:offset + shape.numel()] = state[name].reshape(-1)
        return out

    def view(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: tensor} views into a flat buffer of this layout (sorted names)."""
        return {name: flat[offset:offset + shape.numel()].view(shape)
                for name, offset, shape in zip(self.names, self.offsets, self.shapes)}


def concat(state: State) -> dict[str, torch.Tensor]:
    """The same tensors copied into one buffer (when they share a dtype), returned as views into it (sorted
    names), so kernels over the whole state take it without another copy."""
    layout = Layout.of(state)
    dtypes = {state[n].dtype for n in layout.names}
    if len(dtypes) != 1:
        return dict(sorted(state.items()))
    flat = torch.cat([state[n].reshape(-1) for n in layout.names]) if layout.names else torch.empty(0)
    return layout.view(flat)


def contiguous_view(state: State, layout: Layout) -> torch.Tensor | None:
    """The one 1-D buffer the state's tensors are consecutive slices of (in the layout's order), or None."""
    if not layout.names:
        return None
    first = state[layout.names[0]]
    storage, start = first.untyped_storage().data_ptr(), first.storage_offset()
    for name, offset in zip(layout.names, layout.offsets):
        t = state[name]
        if (t.dtype != first.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != start + offset):
            return None
    return first.as_strided((layout.size,), (1,), start)


def weighted_sum(layout: Layout, states: list[State], weights: list[float]) -> torch.Tensor:
    """sum_i w_i x_i over flat buffers in float64, in the given order, with separate multiply and add steps (no
    fused multiply-add, whose rounding would differ): per element exactly FedAvg's `acc = acc + x_i * w_i`. Done
    one cache-sized block at a time so the accumulator stays in cache while every update is added into it."""
    inputs = [layout.flatten(s, _dtype(s, layout)) for s in states]
    acc = torch.zeros(layout.size, dtype=torch.float64)
    term = torch.empty(min(CHUNK, layout.size), dtype=torch.float64)
    for begin in range(0, layout.size, CHUNK):
        end = min(begin + CHUNK, layout.size)
        block, scratch = acc[begin:end], term[:end - begin]
        for x, weight in zip(inputs, weights, strict=True):
            scratch.copy_(x[begin:end])
            scratch.mul_(weight)
            block.add_(scratch)
    return acc


def _dtype(state: State, layout: Layout) -> torch.dtype:
    """float32 when every tensor is (the flat input is then a view or a float32 copy), else float64."""
    return torch.float32 if all(state[n].dtype == torch.float32 for n in layout.names) else torch.float64
