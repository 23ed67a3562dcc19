"""The merge step: a round's accepted updates, its start adapter and the previous server state turned into the
bytes of the new global adapter. The aggregator publishes what `merge_round` returns and the audit recomputes a
round by calling it again, so "anyone can recompute the aggregate" means literally the same code."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..strategies.base import AggregateError, WeightedUpdate
from .packaging import pack_global
from .rules import FederationRules
from .secagg.masking import merge_weight
from .secagg.unmask import SecureRound
from .verify import Verdict

if TYPE_CHECKING:
    from ..strategies.base import State, Strategy


@dataclass(frozen=True)
class MergedRound:
    state: State                      # the new global adapter's tensors
    data: bytes                       # its canonical file (what the round is finalized with)
    server_state_data: bytes | None   # the server optimizer state file its metadata names (stateful rules)
    strategy: Strategy


def accepted_updates(verdicts: Iterable[Verdict], rules: FederationRules) -> list[WeightedUpdate]:
    """The accepted verdicts as the updates a rule merges, with their declared adapter configs (under secure
    aggregation: the masked updates with their nodes as `adapter_config` and their merge weights)."""
    if rules.secure is not None:
        return [WeightedUpdate(v.submission.index, merge_weight(rules.weighting, v.submission.num_samples), v.state,
                               None, v.submission.file_sha256, v.submission.node) for v in verdicts if v.accepted]
    return [WeightedUpdate(v.submission.index, v.submission.num_samples, v.state, v.adapter_config,
                           v.submission.file_sha256) for v in verdicts if v.accepted]


def merge_round(rules: FederationRules, start: State, server_state: State | None, updates: Sequence[WeightedUpdate],
                federation_id: str, round_id: int, aggregator: str, secure: SecureRound | None = None
                ) -> MergedRound:
    """Merge `updates` with the round's rule from `start` (and the previous round's `server_state`), and package
    the result as the global adapter `aggregator` finalizes round `round_id` of `federation_id` with. Under secure
    aggregation the updates are masked (with their merge weights as `num_samples`): `secure` removes the masks of
    their sum, and the rule merges that one mean update."""
    strategy = rules.strategy(server_state)
    if rules.secure is not None:
        if secure is None:
            raise AggregateError("a securely aggregated round needs its shares to be merged")
        updates = [secure.mean_update(updates, start)]
    merged = strategy.aggregate_train(start, list(updates))
    data, state_data = pack_global(federation_id, round_id, aggregator, rules, merged, strategy.server_state)
    return MergedRound(merged, data, state_data, strategy)
