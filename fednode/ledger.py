"""The federation's history as read back from chain events: participants and rounds, in chain order.
Node, aggregator and audit all read the chain through this one view."""
from __future__ import annotations

from dataclasses import dataclass, field

from chain.clients import Federation, RoundState
from chain.events import ChainEvent


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


@dataclass(frozen=True)
class Submission:
    round_id: int
    index: int
    node: str
    cid_digest: bytes
    file_sha256: bytes
    num_samples: int
    metrics_digest: bytes
    block_number: int
    tx_hash: str


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
    finalized: dict | None = None       # event args + block/tx of RoundFinalized
    cancelled_block: int | None = None

    @property
    def state(self) -> RoundState:
        if self.finalized is not None:
            return RoundState.FINALIZED
        if self.cancelled_block is not None:
            return RoundState.CANCELLED
        return RoundState.OPEN


@dataclass
class History:
    participants: dict[str, ParticipantRecord] = field(default_factory=dict)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    events: list[ChainEvent] = field(default_factory=list)

    def apply(self, e: ChainEvent) -> None:
        a = e.args
        self.events.append(e)
        if e.name == "Joined":
            self.participants[a["node"]] = ParticipantRecord(a["node"], bytes(a["modelId"]),
                                                             bytes(a["metadataDigest"]), e.block_number)
        elif e.name == "Approved":
            self.participants[a["node"]].approved_block = e.block_number
        elif e.name == "Revoked":
            self.participants[a["node"]].revoked_block = e.block_number
            self.participants[a["node"]].revoke_reason = a["reason"]
        elif e.name == "RoundOpened":
            self.rounds[a["roundId"]] = RoundRecord(
                a["roundId"], a["opener"], bytes(a["baseCidDigest"]), bytes(a["baseSha256"]),
                bytes(a["rulesDigest"]), a["deadline"], a["minUpdates"], a["allowBelowQuorum"],
                e.block_number, e.tx_hash)
        elif e.name == "UpdateSubmitted":
            self.rounds[a["roundId"]].submissions.append(Submission(
                a["roundId"], a["index"], a["node"], bytes(a["cidDigest"]), bytes(a["fileSha256"]),
                a["numSamples"], bytes(a["metricsDigest"]), e.block_number, e.tx_hash))
        elif e.name == "RoundFinalized":
            self.rounds[a["roundId"]].finalized = {**a, "verdicts": bytes(a["verdicts"]),
                                                   "block_number": e.block_number, "tx_hash": e.tx_hash}
        elif e.name == "RoundCancelled":
            self.rounds[a["roundId"]].cancelled_block = e.block_number

    def latest_round(self) -> RoundRecord | None:
        return self.rounds[max(self.rounds)] if self.rounds else None


class Ledger:
    """Incrementally follows a federation's events (each refresh reads only new blocks)."""

    def __init__(self, fed: Federation, page: int = 2000):
        self.fed = fed
        self.page = page
        self.history = History()
        self._next_block = fed.deployment.start_block

    def refresh(self) -> History:
        head = self.fed.w3.eth.block_number
        if head >= self._next_block:
            for event in self.fed.events(self._next_block, head, self.page):
                self.history.apply(event)
            self._next_block = head + 1
        return self.history
