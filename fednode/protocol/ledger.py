"""The federation's history as read back from chain events: participants and rounds, in chain order.
Node, aggregator and audit all read the chain through this one view."""
from __future__ import annotations

from dataclasses import dataclass, field

from chain.clients import Federation, RoundState
from chain.events import (Approved, ChainEvent, Configured, Joined, RoundCancelled, RoundFinalized, RoundOpened,
                          Revoked, RulesChanged, SharesRevealed, UnmaskRequested, UpdateSubmitted, record_of)

Submission = UpdateSubmitted  # one submission is exactly its event


@dataclass
class ParticipantRecord:
    address: str
    model_id: bytes
    metadata_digest: bytes
    joined_block: int
    approved_block: int | None = None
    revoked_block: int | None = None
    revoke_reason: int | None = None

    def active_at(self, block: int) -> bool:
        """Approved at or before `block` and not revoked at or before it."""
        return (self.approved_block is not None and self.approved_block <= block
                and (self.revoked_block is None or self.revoked_block > block))


@dataclass
class RoundRecord:
    round_id: int
    opener: str
    base_cid_digest: bytes
    base_sha256: bytes
    rules_digest: bytes
    deadline: int
    min_updates: int
    allow_below_quorum: bool
    opened_block: int
    opened_tx: str
    submissions: list[Submission] = field(default_factory=list)
    finalized: RoundFinalized | None = None
    cancelled_block: int | None = None
    unmask: UnmaskRequested | None = None       # secure aggregation: the survivors fixed, submissions closed
    reveals: list[SharesRevealed] = field(default_factory=list)  # ... and the shares revealed since

    @classmethod
    def opened(cls, e: RoundOpened) -> RoundRecord:
        return cls(e.round_id, e.opener, e.base_cid_digest, e.base_sha256, e.rules_digest, e.deadline, e.min_updates,
                   e.allow_below_quorum, e.block_number, e.tx_hash)

    @property
    def state(self) -> RoundState:
        if self.finalized is not None:
            return RoundState.FINALIZED
        if self.cancelled_block is not None:
            return RoundState.CANCELLED
        return RoundState.OPEN

    @property
    def next_base(self) -> tuple[bytes, bytes]:
        """(CID digest, sha256) of the adapter the round after this one starts from: this round's global adapter
        once finalized, else (cancelled) the adapter this round started from."""
        if self.finalized is not None:
            return self.finalized.cid_digest, self.finalized.file_sha256
        return self.base_cid_digest, self.base_sha256


@dataclass
class History:
    participants: dict[str, ParticipantRecord] = field(default_factory=dict)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    events: list[ChainEvent] = field(default_factory=list)
    configured: Configured | None = None  # the initial adapter and rules (none in histories before lineage)
    rules_changes: list[RulesChanged] = field(default_factory=list)

    def apply(self, e: ChainEvent) -> None:
        self.events.append(e)
        match record_of(e):
            case Joined() as j:
                self.participants[j.node] = ParticipantRecord(j.node, j.model_id, j.metadata_digest, j.block_number)
            case Approved() as a:
                self.participants[a.node].approved_block = a.block_number
            case Revoked() as r:
                self.participants[r.node].revoked_block = r.block_number
                self.participants[r.node].revoke_reason = r.reason
            case Configured() as c:
                self.configured = c
            case RulesChanged() as c:
                self.rules_changes.append(c)
            case RoundOpened() as o:
                self.rounds[o.round_id] = RoundRecord.opened(o)
            case UpdateSubmitted() as u:
                self.rounds[u.round_id].submissions.append(u)
            case RoundFinalized() as f:
                self.rounds[f.round_id].finalized = f
            case RoundCancelled() as c:
                self.rounds[c.round_id].cancelled_block = c.block_number
            case UnmaskRequested() as m:
                self.rounds[m.round_id].unmask = m
            case SharesRevealed() as s:
                self.rounds[s.round_id].reveals.append(s)

    def latest_round(self) -> RoundRecord | None:
        return self.rounds[max(self.rounds)] if self.rounds else None


class Ledger:
    """Incrementally follows a federation's events: each refresh reads only the blocks mined since the last one,
    so one process (aggregator, its nodes, the audit) reads every event once. It keeps nothing on disk: a restarted
    process rebuilds the same history from the chain."""

    def __init__(self, fed: Federation, page: int = 2000):
        self.fed = fed
        self.page = page
        self.history = History()
        self._next_block = fed.deployment.start_block

    @property
    def head(self) -> int:
        """The last block read."""
        return self._next_block - 1

    def refresh(self) -> History:
        head = self.fed.w3.eth.block_number
        if head >= self._next_block:
            for event in self.fed.events(self._next_block, head, self.page):
                self.history.apply(event)
            self._next_block = head + 1
        return self.history
