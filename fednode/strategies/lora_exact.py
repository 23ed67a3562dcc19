"""Exact LoRA aggregation (FlexLoRA-style): the weighted mean of the updates' products B @ A, re-factored to the
global rank by SVD. Its SVD is deterministic on one machine but not bit-portable across BLAS builds, so an auditor
compares a recomputation with the published adapter by their products, within the rule's declared `tolerance`."""
from __future__ import annotations

import math
from typing import ClassVar

from ..learning.lora_math import LoraError, factors, products, refactor_sum, relative, scale, squared
from .base import AggregateError, Param, RulesError, WeightedUpdate
from .fedavg import FedAvg, State


class LoraExact(FedAvg):
    """Exact LoRA aggregation: the weighted mean (FedAvg's weights, submission order) of every update's product
    scale_i B_i @ A_i under its own adapter config (any rank up to the global one, any alpha), re-factored to the
    global rank by SVD (fednode.learning.lora_math.refactor_sum). Stateless; `residual` is the last round's truncation residual.
    The SVD is not bit-portable, so a recomputation is checked with `equivalent` within `tolerance`."""

    name = "lora_exact"
    params_spec: ClassVar[dict[str, Param]] = {"tolerance": Param(1e-6)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.adapter_config is None:
            raise RulesError("lora_exact needs the global adapter config")
        self.residual: dict | None = None

    @property
    def tolerance(self) -> float:
        return self.params["tolerance"]

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        start = _lora("the global adapter", factors, global_state, self.adapter_config)
        shapes = {p: (b.shape[0], a.shape[1]) for p, (a, b) in start.items()}
        terms = {p: [] for p in shapes}
        for u, weight in zip(ordered, weights, strict=True):
            config = u.adapter_config or self.adapter_config
            update = _lora(f"update #{u.index}", factors, u.state, config)
            if {p: (b.shape[0], a.shape[1]) for p, (a, b) in update.items()} != shapes:
                raise AggregateError(f"lora_exact: update #{u.index} adapts other modules or shapes than the global "
                                     f"adapter")
            weighted = weight * scale(config)
            for p, (a, b) in update.items():
                terms[p].append((a, b * weighted))
        merged, self.residual = _lora("the merged update", refactor_sum, terms, self.adapter_config)
        return merged

    def equivalent(self, published: State, recomputed: State) -> tuple[bool, float]:
        """Whether a published global adapter equals a recomputation of it within `tolerance`, compared by the
        modules' products (the factors' signs and last bits may differ between BLAS builds); and the largest
        per-module relative Frobenius error (inf when the two do not have the same modules and shapes)."""
        try:
            mine, theirs = products(recomputed, self.adapter_config), products(published, self.adapter_config)
        except LoraError:
            return False, math.inf
        if {p: t.shape for p, t in mine.items()} != {p: t.shape for p, t in theirs.items()}:
            return False, math.inf
        error = max((relative(squared(theirs[p] - mine[p]), squared(mine[p])) for p in mine), default=0.0)
        return error <= self.tolerance, error


def _lora(what: str, function, *args):
    """function(*args), with a LoraError raised as an AggregateError naming `what`."""
    try:
        return function(*args)
    except LoraError as exc:
        raise AggregateError(f"lora_exact: {what}: {exc}") from None
