"""Aggregation rules. One object owns one rule (Flower style); every rule is deterministic by construction:
updates are taken in on-chain submission order and accumulated in float64 with separate multiply and add steps,
so the same inputs give bit-identical output on any machine."""
from __future__ import annotations

from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightedUpdate:
    index: int          # on-chain submission index: the fixed accumulation order
    num_samples: int
    state: State


class FedAvg:
    """Weighted average of the accepted updates (McMahan et al.), weights by samples or uniform."""

    name = "fedavg"

    def __init__(self, weighting: str = "num_samples"):
        self.weighting = weighting

    def weights(self, updates: list[WeightedUpdate]) -> list[float]:
        raw = [float(u.num_samples) if self.weighting == "num_samples" else 1.0 for u in updates]
        total = sum(raw)
        return [w / total for w in raw]

    def aggregate_train(self, global_state: State, updates: list[WeightedUpdate]) -> State:
        if not updates:
            raise ValueError("no accepted updates to aggregate")
        ordered = sorted(updates, key=lambda u: u.index)
        weights = self.weights(ordered)
        merged = {}
        for key in sorted(global_state):
            acc = torch.zeros(global_state[key].shape, dtype=torch.float64)
            for weight, update in zip(weights, ordered):
                acc = acc + update.state[key].to(torch.float64) * weight
            merged[key] = acc.to(torch.float32)
        return merged


STRATEGIES = {"fedavg": FedAvg}


def strategy_for(rules) -> FedAvg:
    """The aggregation object a round's rules name."""
    from .rules import RulesError

    cls = STRATEGIES.get(rules.aggregation)
    if cls is None:
        raise RulesError(f"unknown aggregation rule {rules.aggregation!r}; known: {', '.join(sorted(STRATEGIES))}")
    return cls(weighting=rules.weighting, **rules.params)
