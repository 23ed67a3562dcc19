"""Machine-independent reductions (fednode.numerics): the global L2 norm, and sums whose bits are the same in a
fresh single-threaded process running ATen's non-vectorized kernels as here."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fednode.flat import Layout, concat, weighted_sum
from fednode.numerics import distance, fixed_sum, fixed_sums_of_squares, norm, squared_distance


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"b.lora_A.weight": torch.randn(8, 64, generator=gen), "a.lora_B.weight": torch.randn(64, 8, generator=gen)}


def test_norm_is_the_global_l2_norm_independent_of_order():
    state = _state()
    flat = torch.cat([v.double().reshape(-1) for v in state.values()])
    assert norm(state) == pytest.approx(float(flat.norm()), rel=1e-12)
    assert norm(dict(reversed(list(state.items())))) == norm(state)
    assert norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == 5.0
    assert math.isnan(norm({"a": torch.tensor([float("nan")])}))
    assert distance(state, {k: torch.zeros_like(v) for k, v in state.items()}) == norm(state)


def test_fixed_sum_is_exact_on_integers_and_handles_every_size():
    for n in (0, 1, 2, 3, 7, 8, 9, 1000, 65537):
        assert fixed_sum(torch.arange(n, dtype=torch.float64)) == n * (n - 1) / 2


CHILD = "import sys, torch; from fednode.numerics import fixed_sum; " \
        "x = torch.randn(300007, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e3; " \
        "print(fixed_sum(x ** 2).hex(), fixed_sum(x).hex())"


def test_fixed_sum_has_the_same_bits_with_other_kernels_and_threads():
    here = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    scalar = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env).stdout
    assert here == scalar and here.strip()


def test_batched_sums_of_squares_and_flat_kernels_have_the_per_tensor_bits():
    """The batched tree (no padding stored) and the flat float64 accumulation give exactly the bits of the
    per-tensor computations they replace, for every size (odd ones included) and for states that are or are not
    laid out in one buffer."""
    gen = torch.Generator().manual_seed(11)
    sizes = (0, 1, 2, 3, 5, 7, 9, 100, 1000, 4097, 70001)  # the last spans two blocks of fednode.flat.CHUNK
    xs = [torch.randn(n, generator=gen, dtype=torch.float64) * 10 for n in sizes]
    assert fixed_sums_of_squares(xs) == [fixed_sum(x ** 2) for x in xs]
    a = {f"t{n}": torch.randn(n, generator=gen) for n in sizes}
    b = {k: v + torch.randn(v.shape, generator=gen) for k, v in a.items()}
    per_tensor = 0.0
    for key in sorted(b):
        per_tensor += fixed_sum((a[key].double() - b[key].double()) ** 2)
    assert squared_distance(concat(a), concat(b)) == squared_distance(a, b) == per_tensor
    weights = [0.1, 0.7, 0.2]
    states = [a, b, {k: v * 3 for k, v in a.items()}]
    layout = Layout.of(a)
    for key, flat in layout.view(weighted_sum(layout, [concat(s) for s in states], weights)).items():
        acc = torch.zeros(flat.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc = acc + state[key].double() * weight
        assert torch.equal(flat, acc), key
    assert torch.equal(weighted_sum(layout, states, weights), weighted_sum(layout, [concat(s) for s in states],
                                                                          weights))
