"""Server-side norm clipping in front of any rule: each update's delta from the start adapter is scaled onto the ball
whose radius is `factor` times the round's median update norm, so no single update can move the global adapter
much further than a typical honest one, whatever the rule behind does with it."""
from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from ..learning.lora_math import truncate
from ..numerics import distance
from .base import WeightedUpdate
from .fedavg import FedAvg, State


class ServerClip:
    """`inner` (any rule), fed with clipped updates; everything else (name, parameters, state, tolerance,
    equivalence) is the inner rule's."""

    def __init__(self, inner: FedAvg, factor: float):
        self.inner = inner
        self.factor = factor
        self.bound: float | None = None  # the last round's clipping radius

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def server_state(self):
        return self.inner.server_state

    def aggregate_train(self, global_state: State, updates: list[WeightedUpdate]) -> State:
        starts = [self._start(global_state, u) for u in updates]
        norms = [distance(u.state, s) for u, s in zip(updates, starts)]
        self.bound = self.factor * statistics.median(norms) if updates else 0.0
        clipped = [u if norm <= self.bound else self._clip(u, start, self.bound / norm)
                   for u, start, norm in zip(updates, starts, norms)]
        return self.inner.aggregate_train(global_state, clipped)

    def _start(self, global_state: State, u: WeightedUpdate) -> State:
        """The adapter the update trained from: the global one, cut to its rank under mixed-rank lora_exact."""
        if u.adapter_config is None or self.inner.adapter_config is None:
            return global_state
        return truncate(global_state, self.inner.adapter_config, u.adapter_config)

    @staticmethod
    def _clip(u: WeightedUpdate, start: State, scale: float) -> WeightedUpdate:
        state = {k: start[k].to(torch.float64) + (u.state[k].to(torch.float64) - start[k].to(torch.float64)) * scale
                 for k in sorted(u.state)}
        return replace(u, state=state)
