"""Every aggregation rule by name, and the one way to build one from a round's rules."""
from __future__ import annotations

from .base import RulesError
from .fedavg import FedAvg, State
from .fedopt import FedAdam, FedAvgM, FedYogi
from .lora_exact import LoraExact

STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, LoraExact)}
RESERVED = ("weighting", "server_state", "adapter_config", "order")  # constructor arguments, never rule parameters


def build(name: str, params: dict, weighting: str, adapter_config: dict, server_state: State | None = None,
          order: str = "sha256") -> FedAvg:
    """The rule `name` with `params`, continuing from `server_state` (the previous round's `strategy.server_state`;
    None in the first round and always for a stateless rule)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise RulesError(f"unknown aggregation rule {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    if not isinstance(params, dict):
        raise RulesError(f"aggregation params must be a JSON object, got {params!r:.80}")
    clash = sorted(set(RESERVED) & params.keys())
    if clash:
        raise RulesError(f"{name} has no parameter {clash[0]!r}")
    return cls(weighting, server_state, adapter_config, order=order, **params)
