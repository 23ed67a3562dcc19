"""Floating-point reductions whose result does not depend on the machine. A library sum (torch, numpy, BLAS)
groups its additions by the CPU's vector width and thread count, so its last bits differ between machines; a
verdict or a selection computed from such a sum could then differ between the aggregator and an auditor. Written
by hand for that reason: the sum is a fixed binary tree of elementwise float64 additions, the same on any
machine."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def fixed_sum(x: torch.Tensor) -> float:
    """The sum of a tensor's elements in float64, as a fixed binary tree: pad to a power of two with zeros, then
    add the even and odd halves elementwise until one number is left. The definition that norms and distances
    reproduce, batched, in `fixed_sums_of_squares`."""
    flat = x.detach().reshape(-1).to(torch.float64)
    size = 1 << max(0, flat.numel() - 1).bit_length()
    tree = torch.zeros(size, dtype=torch.float64)
    tree[:flat.numel()] = flat
    while tree.numel() > 1:
        tree = tree[0::2] + tree[1::2]
    return float(tree[0])


def fixed_sums_of_squares(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> list[float]:
    """[fixed_sum((x - y) ** 2) for x, y in zip(xs, ys)] (x and y in float64; y = 0 without `ys`) with the same
    bits, batched: tensors of the same size are the rows of one matrix whose columns are halved together, one
    kernel call per tree level for the whole batch, and each row is written in place (no float64 copy of a whole
    state). The zero padding of fixed_sum's tree is not stored: a pair of padding zeros sums to zero and x + 0 is
    x, so only the pairs that hold a value are added (one zero column stands in for the padding of an odd
    length)."""
    sums = [0.0] * len(xs)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.numel(), []).append(i)
    for size, members in groups.items():
        tree = torch.zeros(len(members), size + 1, dtype=torch.float64)
        for row, i in enumerate(members):
            tree[row, :size] = xs[i].reshape(-1)
            if ys is not None:
                tree[row, :size] -= ys[i].reshape(-1)  # in float64: the float32 operand is widened exactly
        tree.pow_(2)
        other = torch.zeros(len(members), size // 2 + 2, dtype=torch.float64)
        while size > 1:  # level by level, into the other buffer
            half = (size + 1) // 2
            torch.add(tree[:, 0:2 * half:2], tree[:, 1:2 * half:2], out=other[:, :half])
            other[:, half] = 0.0
            tree, other = other, tree
            size = half
        for row, i in enumerate(members):
            sums[i] = float(tree[row, 0])
    return sums


def norm(state: Mapping[str, torch.Tensor]) -> float:
    """The global L2 norm of a state, tensor by tensor in sorted-name order."""
    return math.sqrt(sum(fixed_sums_of_squares([state[key] for key in sorted(state)])))


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b||^2 over every tensor of `b` (float64), summed tensor by tensor in sorted-name order."""
    keys = sorted(b)
    total = 0.0
    for part in fixed_sums_of_squares([a[key] for key in keys], [b[key] for key in keys]):
        total += part
    return total


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b||, the L2 distance of two states over `b`'s tensors."""
    return math.sqrt(squared_distance(a, b))
