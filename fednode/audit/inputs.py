"""The inputs of a round's aggregation as the audit re-derives them, and the merge over any subset of them."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.ledger import Submission
from ..protocol.merge import MergedRound, accepted_updates, merge_round
from ..protocol.rules import FederationRules
from ..protocol.secagg.unmask import SecureRound
from ..protocol.verify import Verdict


@dataclass
class RoundInputs:
    """What a round's aggregation starts from: its rules, start adapter, server optimizer state, and the verdict on
    the bytes of every submission whose bytes could be verified (by submission index)."""
    rules: FederationRules
    start: dict
    server_state: dict | None
    submissions: list[Submission]
    federation_id: str
    round_id: int
    aggregator: str
    content: dict[int, Verdict] = field(default_factory=dict)
    secure: SecureRound | None = None  # secure aggregation: what removes the survivors' masks

    def merge(self, at: list[int], rules: FederationRules | None = None) -> MergedRound:
        """The aggregate of the updates at indices `at` (repeats count twice), as the aggregator must have packed
        it, under the round's rules or `rules`."""
        rules = rules or self.rules
        return merge_round(rules, self.start, self.server_state, accepted_updates((self.content[i] for i in at), rules),
                           self.federation_id, self.round_id, self.aggregator, self.secure)
