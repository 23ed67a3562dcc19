"""Every aggregation rule by name, and the one way to build one from a round's rules."""
from __future__ import annotations

from .base import RulesError, Strategy
from .clipping import ServerClip
from .fedavg import FedAvg, State
from .fedopt import FedAdam, FedAvgM, FedYogi
from .lora_exact import LoraExact
from .robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean

STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (
    FedAvg, FedAvgM, FedAdam, FedYogi, LoraExact, CoordinateMedian, TrimmedMean, Krum, MultiKrum)}
RESERVED = ("weighting", "server_state", "adapter_config", "order", "max_weight_share")  # never rule parameters


def build(name: str, params: dict, weighting: str, adapter_config: dict, server_state: State | None = None,
          order: str = "sha256", max_weight_share: float = 1.0, server_clip: float = 0.0) -> Strategy:
    """The rule `name` with `params`, continuing from `server_state` (the previous round's `strategy.server_state`;
    None in the first round and always for a stateless rule), behind server-side clipping when `server_clip`."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise RulesError(f"unknown aggregation rule {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    if not isinstance(params, dict):
        raise RulesError(f"aggregation params must be a JSON object, got {params!r:.80}")
    clash = sorted(set(RESERVED) & params.keys())
    if clash:
        raise RulesError(f"{name} has no parameter {clash[0]!r}")
    rule = cls(weighting, server_state, adapter_config, order=order, max_weight_share=max_weight_share, **params)
    return ServerClip(rule, server_clip) if server_clip else rule
