"""What every aggregation rule is (Flower's shape: one object owns one rule): a `Strategy` with a name, validated
parameters, `aggregate_train(start, updates)`, the `server_state` it carries between rounds and `equivalent`,
which says whether a published result equals a recomputation of it. Importable without torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]


class RulesError(ValueError):
    """Rules that cannot be applied (unknown rule, bad parameter)."""


class AggregateError(ValueError):
    """Updates or server state that cannot be aggregated (none accepted, or a state of other tensors)."""


@dataclass(frozen=True)
class WeightedUpdate:
    index: int          # on-chain submission index
    num_samples: int
    state: State
    adapter_config: dict | None = None  # the update's own peft config (file metadata); None = the rules' config
    file_sha256: bytes = b""            # the update file's digest: the canonical merge order
    node: str = ""                      # the sender (secure aggregation removes masks by sender)


@dataclass(frozen=True)
class Param:
    """A rule parameter: its default and its range, > 0 or (when `fraction`) in [0, 1); `integer` ones are whole
    numbers >= 1."""

    default: float
    fraction: bool = False
    integer: bool = False

    def check(self, rule: str, name: str, value) -> float:
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RulesError(f"{rule} parameter {name} must be a whole number >= 1, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RulesError(f"{rule} parameter {name} must be a finite number, got {value!r}")
        if not (0 <= value < 1 if self.fraction else value > 0):
            raise RulesError(f"{rule} parameter {name} must be {'in [0, 1)' if self.fraction else '> 0'}, "
                             f"got {value}")
        return float(value)


def capped_shares(shares: list[float], cap: float) -> list[float]:
    """Weights summing to 1 with none above `cap` (at least 1/n): every weight over it is set to it and the rest is
    shared among the others in proportion to their weights, repeated until none is over (water-filling)."""
    cap = max(cap, 1.0 / len(shares))
    fixed: set[int] = set()
    while True:
        free = sum(w for i, w in enumerate(shares) if i not in fixed)
        budget = 1.0 - cap * len(fixed)
        scaled = [cap if i in fixed else w * budget / free for i, w in enumerate(shares)]
        over = {i for i, w in enumerate(scaled) if i not in fixed and w > cap}
        if not over:
            return scaled
        fixed |= over


class Strategy(Protocol):
    """One aggregation rule. `tolerance` is 0 for a rule whose result is bit-exact on any machine; otherwise the
    relative error within which `equivalent` accepts a recomputation."""

    name: ClassVar[str]
    params_spec: ClassVar[dict[str, Param]]
    params: dict[str, float]
    server_state: State | None
    tolerance: float
    min_updates: int  # the fewest accepted updates the rule can merge

    def aggregate_train(self, start: State, updates: list[WeightedUpdate]) -> State:
        """The new global adapter from the round's start adapter and its accepted updates."""

    def equivalent(self, published: State, recomputed: State) -> tuple[bool, float]:
        """Whether a published result equals a recomputation of it, and the error measured."""
