"""Floating-point reductions whose result does not depend on the machine. A library sum (torch, numpy, BLAS)
groups its additions by the CPU's vector width and thread count, so its last bits differ between machines; a
verdict or a selection computed from such a sum could then differ between the aggregator and an auditor. Written
by hand for that reason: the sum is a fixed binary tree of elementwise float64 additions, the same on any
machine."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def fixed_sum(x: torch.Tensor) -> float:
    """The sum of a tensor's elements in float64, as a fixed binary tree: pad to a power of two with zeros, then
    add the even and odd halves elementwise until one number is left."""
    flat = x.detach().reshape(-1).to(torch.float64)
    size = 1 << max(0, flat.numel() - 1).bit_length()
    tree = torch.zeros(size, dtype=torch.float64)
    tree[:flat.numel()] = flat
    while tree.numel() > 1:
        tree = tree[0::2] + tree[1::2]
    return float(tree[0])


def norm(state: Mapping[str, torch.Tensor]) -> float:
    """The global L2 norm of a state, tensor by tensor in sorted-name order."""
    return math.sqrt(sum(fixed_sum(state[key].to(torch.float64) ** 2) for key in sorted(state)))


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b||^2 over every tensor of `b` (float64), summed tensor by tensor in sorted-name order."""
    total = 0.0
    for key in sorted(b):
        total += fixed_sum((a[key].to(torch.float64) - b[key].to(torch.float64)) ** 2)
    return total


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b||, the L2 distance of two states over `b`'s tensors."""
    return math.sqrt(squared_distance(a, b))
