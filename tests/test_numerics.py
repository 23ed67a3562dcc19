"""Machine-independent reductions (fednode.numerics): the global L2 norm, and sums whose bits are the same in a
fresh single-threaded process running ATen's non-vectorized kernels as here."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fednode.numerics import distance, fixed_sum, norm


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
