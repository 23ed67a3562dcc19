"""Server optimizers on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization"; Flower's FedOpt):
FedAvgM, FedAdam, FedYogi. They apply elementwise float64 kernels one at a time (no fused ops, no reductions), so
the same inputs give bit-identical output on any machine.

A server optimizer keeps state between rounds (`server_state`, float32 tensors named "<slot>.<adapter tensor>").
The state is rounded to float32 after every round, exactly as it is stored, so an aggregator that restores it
from its canonical file continues bit for bit where an uninterrupted one would be."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..flat import Layout
from .base import AggregateError, Param, WeightedUpdate
from .fedavg import FedAvg, State


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
        layout = Layout.of(global_state)  # every kernel below is elementwise: one call over the flat adapter
        mean = self._mean(layout, ordered, weights)
        delta = mean - layout.flatten(global_state)
        slots = [layout.flatten({key: state[f"{slot}.{key}"] for key in layout.names}) for slot in self.slots]
        increment, slots = self.step(delta, *slots)
        # x + increment, written as mean + (increment - delta): an increment equal to delta (FedAvgM without
        # momentum at rate 1) then gives FedAvg's bits exactly, which x + (mean - x) does not always
        change = increment - delta
        self.server_state = {f"{slot}.{key}": t for slot, flat in zip(self.slots, slots)
                             for key, t in layout.view(flat.to(torch.float32)).items()}
        return layout.view((mean + change).to(torch.float32))


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
