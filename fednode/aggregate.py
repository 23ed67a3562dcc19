"""Aggregation rules. One object owns one rule (Flower style); every rule is deterministic by construction:
updates are taken in on-chain submission order and accumulated in float64 with separate multiply and add steps,
and the server optimizers (FedAvgM, FedAdam, FedYogi) apply elementwise float64 kernels one at a time (no fused
ops, no reductions), so the same inputs give bit-identical output on any machine.

A server optimizer keeps state between rounds (`server_state`, float32 tensors named "<slot>.<adapter tensor>").
The state is rounded to float32 after every round, exactly as it is stored, so an aggregator that restores it
from its canonical file continues bit for bit where an uninterrupted one would be."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .rules import RulesError

State = dict[str, torch.Tensor]


class AggregateError(ValueError):
    """Updates or server state that cannot be aggregated (none accepted, or a state of other tensors)."""


@dataclass(frozen=True)
class WeightedUpdate:
    index: int          # on-chain submission index: the fixed accumulation order
    num_samples: int
    state: State


@dataclass(frozen=True)
class Param:
    """A rule parameter: its default and its range, > 0 or (when `fraction`) in [0, 1)."""

    default: float
    fraction: bool = False

    def check(self, rule: str, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RulesError(f"{rule} parameter {name} must be a finite number, got {value!r}")
        if not (0 <= value < 1 if self.fraction else value > 0):
            raise RulesError(f"{rule} parameter {name} must be {'in [0, 1)' if self.fraction else '> 0'}, "
                             f"got {value}")
        return float(value)


class FedAvg:
    """Weighted average of the accepted updates (McMahan et al.), weights by samples or uniform. Stateless."""

    name = "fedavg"
    params_spec: ClassVar[dict[str, Param]] = {}

    def __init__(self, weighting: str = "num_samples", server_state: State | None = None, **params: float):
        unknown = sorted(set(params) - set(self.params_spec))
        if unknown:
            known = ", ".join(sorted(self.params_spec)) or "none"
            raise RulesError(f"{self.name} has no parameter {unknown[0]!r}; known: {known}")
        self.weighting = weighting
        self.params = {k: spec.check(self.name, k, params.get(k, spec.default)) for k, spec in self.params_spec.items()}
        self.server_state = server_state

    def weights(self, updates: list[WeightedUpdate]) -> list[float]:
        raw = [float(u.num_samples) if self.weighting == "num_samples" else 1.0 for u in updates]
        total = sum(raw)
        return [w / total for w in raw]

    def _ordered(self, updates: list[WeightedUpdate]) -> tuple[list[WeightedUpdate], list[float]]:
        if not updates:
            raise AggregateError("no accepted updates to aggregate")
        ordered = sorted(updates, key=lambda u: u.index)
        return ordered, self.weights(ordered)

    @staticmethod
    def _mean(key: str, shape: torch.Size, ordered: list[WeightedUpdate], weights: list[float]) -> torch.Tensor:
        """The float64 weighted mean of one tensor, accumulated in submission order."""
        acc = torch.zeros(shape, dtype=torch.float64)
        for weight, update in zip(weights, ordered):
            acc = acc + update.state[key].to(torch.float64) * weight
        return acc

    def aggregate_train(self, global_state: State, updates: list[WeightedUpdate]) -> State:
        if self.server_state is not None:
            raise AggregateError(f"{self.name} keeps no server state, yet was given one")
        ordered, weights = self._ordered(updates)
        return {key: self._mean(key, global_state[key].shape, ordered, weights).to(torch.float32)
                for key in sorted(global_state)}


class FedOpt(FedAvg):
    """A server optimizer on the pseudo-gradient delta = FedAvg(updates) - global (Reddi et al., "Adaptive
    Federated Optimization"; Flower's FedOpt): x <- x + step(delta), with per-tensor state in `slots`."""

    slots: ClassVar[tuple[str, ...]] = ()

    def step(self, delta: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(the increment to the global tensor, the new state of each slot), all float64."""
        raise NotImplementedError

    def previous(self, global_state: State) -> State:
        """Last round's state in float64, zeros in the first round; it must hold exactly this rule's tensors."""
        if self.server_state is None:
            return {f"{slot}.{key}": torch.zeros(t.shape, dtype=torch.float64)
                    for key, t in global_state.items() for slot in self.slots}
        expected = {f"{slot}.{key}": t.shape for key, t in global_state.items() for slot in self.slots}
        given = {name: t.shape for name, t in self.server_state.items()}
        if given != expected:
            wrong = sorted(expected.keys() ^ given.keys()) or sorted(k for k in expected if expected[k] != given[k])
            raise AggregateError(f"{self.name} server state does not fit the adapter: tensor {wrong[0]!r} is "
                                 f"missing, unexpected or misshapen")
        return {name: t.to(torch.float64) for name, t in self.server_state.items()}

    def aggregate_train(self, global_state: State, updates: list[WeightedUpdate]) -> State:
        ordered, weights = self._ordered(updates)
        state = self.previous(global_state)
        merged, new_state = {}, {}
        for key in sorted(global_state):
            mean = self._mean(key, global_state[key].shape, ordered, weights)
            delta = mean - global_state[key].to(torch.float64)
            increment, slots = self.step(delta, *(state[f"{slot}.{key}"] for slot in self.slots))
            # x + increment, written as mean + (increment - delta): an increment equal to delta (FedAvgM without
            # momentum at rate 1) then gives FedAvg's bits exactly, which x + (mean - x) does not always
            change = increment - delta
            merged[key] = (mean + change).to(torch.float32)
            new_state.update({f"{slot}.{key}": t.to(torch.float32) for slot, t in zip(self.slots, slots)})
        self.server_state = new_state
        return merged


class FedAvgM(FedOpt):
    """FedAvg with server momentum (Hsu et al. 2019; Flower's FedAvgM): v <- momentum * v + delta,
    x <- x + lr * v. Flower's defaults: learning rate 1, momentum 0."""

    name = "fedavgm"
    slots = ("momentum",)
    params_spec: ClassVar[dict[str, Param]] = {"server_learning_rate": Param(1.0),
                                               "server_momentum": Param(0.0, fraction=True)}

    def step(self, delta, v):
        v = v * self.params["server_momentum"]
        v = v + delta
        return v * self.params["server_learning_rate"], (v,)


class FedAdam(FedOpt):
    """m <- b1 m + (1 - b1) delta; v <- b2 v + (1 - b2) delta^2; x <- x + eta m / (sqrt(v) + tau); no bias
    correction, as Flower. Flower's defaults."""

    name = "fedadam"
    slots = ("m", "v")
    params_spec: ClassVar[dict[str, Param]] = {"eta": Param(1e-1), "beta_1": Param(0.9, fraction=True),
                                               "beta_2": Param(0.99, fraction=True), "tau": Param(1e-9)}

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        v = v * self.params["beta_2"]
        return v + square * (1.0 - self.params["beta_2"])

    def step(self, delta, m, v):
        m = m * self.params["beta_1"]
        m = m + delta * (1.0 - self.params["beta_1"])
        v = self.second_moment(v, delta * delta)
        denominator = torch.sqrt(v) + self.params["tau"]
        return m * self.params["eta"] / denominator, (m, v)


class FedYogi(FedAdam):
    """FedAdam with Yogi's second moment: v <- v - (1 - b2) delta^2 sign(v - delta^2). Flower's defaults."""

    name = "fedyogi"
    params_spec: ClassVar[dict[str, Param]] = {"eta": Param(1e-2), "beta_1": Param(0.9, fraction=True),
                                               "beta_2": Param(0.99, fraction=True), "tau": Param(1e-3)}

    def second_moment(self, v, square):
        change = square * (1.0 - self.params["beta_2"])
        return v - change * torch.sign(v - square)


STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi)}


def strategy_for(rules, server_state: State | None = None) -> FedAvg:
    """The aggregation object a round's rules name, continuing from `server_state` (the previous round's
    `strategy.server_state`; None in the first round and always for FedAvg)."""
    cls = STRATEGIES.get(rules.aggregation)
    if cls is None:
        raise RulesError(f"unknown aggregation rule {rules.aggregation!r}; known: {', '.join(sorted(STRATEGIES))}")
    if not isinstance(rules.params, dict):
        raise RulesError(f"aggregation params must be a JSON object, got {rules.params!r:.80}")
    clash = sorted({"weighting", "server_state"} & rules.params.keys())
    if clash:
        raise RulesError(f"{rules.aggregation} has no parameter {clash[0]!r}")
    return cls(rules.weighting, server_state, **rules.params)
