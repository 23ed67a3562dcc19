"""Aggregation rules that a few dishonest updates cannot steer: the coordinate-wise median, the trimmed mean
(Yin et al. 2018) and Krum / Multi-Krum (Blanchard et al. 2017). Bit-exact like FedAvg: sorting is exact, sums
are elementwise float64 additions in a fixed order, and Krum's distances are machine-independent sums
(`fednode.numerics`), so an auditor anywhere selects the same updates. The median and the trimmed mean weigh every
update alike (samples cannot buy influence); Multi-Krum averages the updates it selects with FedAvg's weights."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..numerics import squared_distance
from .base import Param, RulesError, WeightedUpdate
from .fedavg import FedAvg, State


class CoordinateMedian(FedAvg):
    """Per coordinate, the median of the updates (the mean of the two middle values for an even count)."""

    name = "median"

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        n = len(ordered)
        out = {}
        for key in sorted(global_state):
            values = torch.sort(torch.stack([u.state[key].to(torch.float64) for u in ordered]), dim=0).values
            middle = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) * 0.5
            out[key] = middle.to(torch.float32)
        return out


class TrimmedMean(FedAvg):
    """Per coordinate, the mean after dropping the floor(beta * n) smallest and largest values (Flower's
    FedTrimmedAvg; beta in [0, 0.5))."""

    name = "trimmed_mean"
    params_spec: ClassVar[dict[str, Param]] = {"beta": Param(0.2, fraction=True)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params["beta"] >= 0.5:
            raise RulesError(f"trimmed_mean parameter beta must be below 0.5, got {self.params['beta']}")

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        n = len(ordered)
        trim = math.floor(self.params["beta"] * n)
        share = 1.0 / (n - 2 * trim)
        out = {}
        for key in sorted(global_state):
            values = torch.sort(torch.stack([u.state[key].to(torch.float64) for u in ordered]), dim=0).values
            acc = torch.zeros(global_state[key].shape, dtype=torch.float64)
            for i in range(trim, n - trim):
                acc = acc + values[i] * share
            out[key] = acc.to(torch.float32)
        return out


class MultiKrum(FedAvg):
    """Score each update by the summed squared distances to its n - f - 2 nearest others; select the `m` best
    (ties: the canonical merge order) and average them with FedAvg's weights. Needs n >= 2f + 3 and m <= n - f."""

    name = "multi_krum"
    params_spec: ClassVar[dict[str, Param]] = {"f": Param(1, integer=True), "m": Param(3, integer=True)}

    @property
    def selected(self) -> int:
        return self.params["m"]

    @property
    def min_updates(self) -> int:
        return max(2 * self.params["f"] + 3, self.selected + self.params["f"])

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        picked = [ordered[i] for i in self.select(ordered)]
        self.chosen = [u.index for u in picked]  # the last round's selection, by submission index
        return super().merge(global_state, picked, self.weights(picked))

    def select(self, ordered: list[WeightedUpdate]) -> list[int]:
        """Positions in `ordered` of the selected updates, best score first."""
        n, f = len(ordered), self.params["f"]
        dist = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                dist[i][j] = dist[j][i] = squared_distance(ordered[i].state, ordered[j].state)
        scores = [sum(sorted(dist[i][j] for j in range(n) if j != i)[:n - f - 2]) for i in range(n)]
        return sorted(range(n), key=lambda i: (scores[i], i))[:self.selected]


class Krum(MultiKrum):
    """Krum: the one update with the best score becomes the new global adapter."""

    name = "krum"
    params_spec: ClassVar[dict[str, Param]] = {"f": Param(1, integer=True)}

    @property
    def selected(self) -> int:
        return 1
