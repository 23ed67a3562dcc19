"""FedAvg (McMahan et al.), the base of every rule. Deterministic by construction: updates are taken in a canonical
order and accumulated in float64 with separate multiply and add steps, so the same inputs give bit-identical output
on any machine. The sums run over one flat float64 buffer per round (`fednode.flat`), which changes how many
kernel calls there are, not a single bit. The order is the rules' `merge_order`: "sha256" (by the update file's
digest, then submission index: the same accepted updates give the same bytes whatever order their transactions
landed in) or "submission" (on-chain submission order, what rules documents before version 2 mean)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..flat import Layout, weighted_sum
from .base import AggregateError, Param, RulesError, WeightedUpdate, capped_shares

State = dict[str, torch.Tensor]
ORDERS = {"sha256": lambda u: (u.file_sha256, u.index), "submission": lambda u: u.index}


class FedAvg:
    """Weighted average of the accepted updates (McMahan et al.), weights by samples or uniform. Stateless."""

    name = "fedavg"
    params_spec: ClassVar[dict[str, Param]] = {}
    tolerance = 0.0  # bit-exact

    def __init__(self, weighting: str = "num_samples", server_state: State | None = None,
                 adapter_config: dict | None = None, *, order: str = "sha256", max_weight_share: float = 1.0,
                 **params: float):
        unknown = sorted(set(params) - set(self.params_spec))
        if unknown:
            known = ", ".join(sorted(self.params_spec)) or "none"
            raise RulesError(f"{self.name} has no parameter {unknown[0]!r}; known: {known}")
        if order not in ORDERS:
            raise RulesError(f"merge_order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.weighting = weighting
        self.order = order
        self.max_weight_share = max_weight_share
        self.params = {k: spec.check(self.name, k, params.get(k, spec.default)) for k, spec in self.params_spec.items()}
        self.server_state = server_state
        self.adapter_config = adapter_config  # the global adapter's config (the rules' `lora`)

    @property
    def min_updates(self) -> int:
        return 1

    def weights(self, updates: list[WeightedUpdate]) -> list[float]:
        """Each update's share: by samples or uniform, capped at max_weight_share (base.capped_shares)."""
        raw = [float(u.num_samples) if self.weighting == "num_samples" else 1.0 for u in updates]
        total = sum(raw)
        shares = [w / total for w in raw]
        return shares if self.max_weight_share >= 1 else capped_shares(shares, self.max_weight_share)

    def _ordered(self, updates: list[WeightedUpdate]) -> tuple[list[WeightedUpdate], list[float]]:
        if len(updates) < self.min_updates:
            raise AggregateError(f"{self.name} merges at least {self.min_updates} updates, got {len(updates)}"
                                 if updates else "no accepted updates to aggregate")
        ordered = sorted(updates, key=ORDERS[self.order])
        return ordered, self.weights(ordered)

    @staticmethod
    def _mean(layout: Layout, ordered: list[WeightedUpdate], weights: list[float]) -> torch.Tensor:
        """The float64 weighted mean of every tensor of `layout`, flat, accumulated in the given order."""
        return weighted_sum(layout, [u.state for u in ordered], weights)

    def aggregate_train(self, global_state: State, updates: list[WeightedUpdate]) -> State:
        if self.server_state is not None:
            raise AggregateError(f"{self.name} keeps no server state, yet was given one")
        return self.merge(global_state, *self._ordered(updates))

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        """The new global adapter from the updates in submission order and their weights."""
        layout = Layout.of(global_state)
        return layout.view(self._mean(layout, ordered, weights).to(torch.float32))

    def equivalent(self, published: State, recomputed: State) -> tuple[bool, float]:
        """Bit equality of every tensor, and the largest absolute difference (inf for other names or shapes)."""
        if published.keys() != recomputed.keys() or any(published[k].shape != recomputed[k].shape
                                                         for k in recomputed):
            return False, math.inf
        error = max((float(torch.max(torch.abs(published[k].double() - recomputed[k].double())))
                     for k in recomputed if published[k].numel()), default=0.0)
        return all(torch.equal(published[k], recomputed[k]) for k in recomputed), error
