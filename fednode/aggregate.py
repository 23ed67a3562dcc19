"""Aggregation rules. One object owns one rule (Flower style); every rule is deterministic by construction:
updates are taken in on-chain submission order and accumulated in float64 with separate multiply and add steps,
and the server optimizers (FedAvgM, FedAdam, FedYogi) apply elementwise float64 kernels one at a time (no fused
ops, no reductions), so the same inputs give bit-identical output on any machine. The exception is lora_exact:
its SVD is deterministic on one machine but not bit-portable across BLAS builds, so an auditor compares its
recomputation with the published adapter by their products, within the rule's declared `tolerance`.

A server optimizer keeps state between rounds (`server_state`, float32 tensors named "<slot>.<adapter tensor>").
The state is rounded to float32 after every round, exactly as it is stored, so an aggregator that restores it
from its canonical file continues bit for bit where an uninterrupted one would be."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .lora_math import LoraError, factors, products, refactor_sum, relative, scale, squared
from .rules import RulesError

State = dict[str, torch.Tensor]


class AggregateError(ValueError):
    """Updates or server state that cannot be aggregated (none accepted, or a state of other tensors)."""


@dataclass(frozen=True)
class WeightedUpdate:
    index: int          # on-chain submission index: the fixed accumulation order
    num_samples: int
    state: State
    adapter_config: dict | None = None  # the update's own peft config (file metadata); None = the rules' config


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

    def __init__(self, weighting: str = "num_samples", server_state: State | None = None,
                 adapter_config: dict | None = None, **params: float):
        unknown = sorted(set(params) - set(self.params_spec))
        if unknown:
            known = ", ".join(sorted(self.params_spec)) or "none"
            raise RulesError(f"{self.name} has no parameter {unknown[0]!r}; known: {known}")
        self.weighting = weighting
        self.params = {k: spec.check(self.name, k, params.get(k, spec.default)) for k, spec in self.params_spec.items()}
        self.server_state = server_state
        self.adapter_config = adapter_config  # the global adapter's config (the rules' `lora`)

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
        return self.merge(global_state, *self._ordered(updates))

    def merge(self, global_state: State, ordered: list[WeightedUpdate], weights: list[float]) -> State:
        """The new global adapter from the updates in submission order and their weights."""
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


class LoraExact(FedAvg):
    """Exact LoRA aggregation: the weighted mean (FedAvg's weights, submission order) of every update's product
    scale_i B_i @ A_i under its own adapter config (any rank up to the global one, any alpha), re-factored to the
    global rank by SVD (fednode.lora_math.refactor_sum). Stateless; `residual` is the last round's truncation residual.
    The SVD is not bit-portable, so a recomputation is checked with `equivalent` within `tolerance`."""

    name = "lora_exact"
    params_spec: ClassVar[dict[str, Param]] = {"tolerance": Param(1e-6)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.adapter_config is None:
            raise RulesError("lora_exact needs the global adapter config")
        self.residual: dict | None = None

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
            for p, (a, b) in update.items():
                terms[p].append((a, b * (weight * scale(config))))
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
        return error <= self.params["tolerance"], error


def _lora(what: str, function, *args):
    """function(*args), with a LoraError raised as an AggregateError naming `what`."""
    try:
        return function(*args)
    except LoraError as exc:
        raise AggregateError(f"lora_exact: {what}: {exc}") from None


STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, LoraExact)}


def strategy_for(rules, server_state: State | None = None) -> FedAvg:
    """The aggregation object a round's rules name, continuing from `server_state` (the previous round's
    `strategy.server_state`; None in the first round and always for FedAvg)."""
    cls = STRATEGIES.get(rules.aggregation)
    if cls is None:
        raise RulesError(f"unknown aggregation rule {rules.aggregation!r}; known: {', '.join(sorted(STRATEGIES))}")
    if not isinstance(rules.params, dict):
        raise RulesError(f"aggregation params must be a JSON object, got {rules.params!r:.80}")
    clash = sorted({"weighting", "server_state", "adapter_config"} & rules.params.keys())
    if clash:
        raise RulesError(f"{rules.aggregation} has no parameter {clash[0]!r}")
    return cls(rules.weighting, server_state, rules.lora, **rules.params)
