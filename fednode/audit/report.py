"""The audit report: what was found per participant, round and submission, as records that serialize to JSON and
print as a terminal table."""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field


class Status(enum.StrEnum):
    VERIFIED = "VERIFIED"        # everything re-checked from chain + storage, global adapter bit-identical (or,
    # for lora_exact, equal within the rules' declared tolerance: a note says so)
    CONSISTENT = "CONSISTENT"    # on-chain records agree with each other (no storage re-check asked for)
    MISMATCH = "MISMATCH"        # something provably differs from what the rules give
    UNAVAILABLE = "UNAVAILABLE"  # content needed to check the round cannot be fetched intact
    OPEN = "OPEN"
    CANCELLED = "CANCELLED"


FAILED = (Status.MISMATCH, Status.UNAVAILABLE)


@dataclass
class Finding:
    status: Status
    message: str


@dataclass
class SubmissionAudit:
    index: int
    node: str
    hospital: str | None
    cid: str
    file_sha256: str
    num_samples: int
    metrics_cid: str
    block: int
    tx: str
    gas: int
    verdict: str | None = None       # on-chain reason name (finalized rounds)
    recomputed: str | None = None    # reason name the verification rules give now
    detail: str = ""
    update_norm: float | None = None
    metrics: dict | None = None      # the node's published metrics document
    bytes: int | None = None         # size of the update file (what the hospital uploaded), when fetched
    status: Status | None = None     # MISMATCH / UNAVAILABLE when this update fails the audit
    relayed_by: str | None = None    # the account that relayed this signed update (None: sent by the node)


@dataclass
class ResultAudit:
    aggregator: str
    block: int
    tx: str
    gas: int
    cid: str
    file_sha256: str
    accepted: int
    verdicts: list[int]
    merged: list[int]                       # submission indices merged according to the on-chain verdicts
    recomputed_merged: list[int] | None = None
    recomputed_sha256: str | None = None


@dataclass
class RoundAudit:
    round_id: int
    state: str
    opener: str
    opened_block: int
    opened_tx: str
    open_gas: int
    deadline: int
    min_updates: int
    allow_below_quorum: bool
    base_cid: str
    base_sha256: str
    rules_digest: str
    rules: dict | None = None
    submissions: list[SubmissionAudit] = field(default_factory=list)
    result: ResultAudit | None = None
    cancelled_block: int | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: Status = Status.CONSISTENT
    privacy: dict | None = None   # client-side DP: the accountant's epsilon after this round, recomputed here

    def find(self, status: Status, message: str) -> None:
        self.findings.append(Finding(status, message))


@dataclass
class ParticipantAudit:
    address: str
    hospital: str | None
    model_id: str
    card_cid: str
    joined_block: int
    approved_block: int | None
    revoked_block: int | None
    revoke_reason: int | None
    gas: dict[str, int]
    card: dict | None = None


@dataclass
class AuditReport:
    federation_id: str
    chain_id: int
    contract: str
    from_block: int
    head_block: int
    events: int
    storage: str | None
    verified: bool
    participants: list[ParticipantAudit]
    rounds: list[RoundAudit]
    seconds: dict[str, float] = field(default_factory=dict)
    comparison: dict | None = None  # where the hospitals' data is (the demo): federated vs local-only per hospital
    # (fednode.ops.comparison), shown beside the audit; not re-derived from the chain

    @property
    def ok(self) -> bool:
        return not any(r.status in FAILED for r in self.rounds)

    @property
    def exit_code(self) -> int:
        """0: every round checks out; 1: a MISMATCH or UNAVAILABLE round; 3: no failure, but the last round is
        still open (the federation is running: audit again once it is finalized or cancelled)."""
        if not self.ok:
            return 1
        return 3 if self.rounds and self.rounds[-1].status == Status.OPEN else 0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rounds:
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        if not counts:
            return "audit: no rounds"
        if len(counts) == 1:
            status, n = next(iter(counts.items()))
            text = f"audit: {n} round{'s' * (n != 1)} {status}"
        else:
            text = f"audit: {len(self.rounds)} rounds: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        if self.exit_code == 3:
            text += f" (round {self.rounds[-1].round_id} is still open: audit again once it is finalized or cancelled)"
        return text

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def table(self) -> str:
        """The report as a terminal table."""
        lines = [f"federation {self.federation_id} (blocks {self.from_block}-{self.head_block}, {self.events} events"
                 f"; storage {self.storage or 'none'})", "", "participants"]
        lines.append(f"  {'address':<44} {'hospital':<12} {'joined':>6} {'approved':>8} {'revoked':>7}  model id")
        for p in self.participants:
            lines.append(f"  {p.address:<44} {p.hospital or '?':<12} {p.joined_block:>6} "
                         f"{_blank(p.approved_block):>8} {_blank(p.revoked_block):>7}  {p.model_id[:18]}…")
        lines += ["", "rounds",
                  f"  {'round':>5} {'state':<10} {'opened':>6} {'closed':>6} {'subs':>4} {'merged':>6}  "
                  f"{'global CID':<24} {'gas':>8}  status"]
        for r in self.rounds:
            res = r.result
            closed = res.block if res else r.cancelled_block
            eps = f"  epsilon {r.privacy['epsilon']:.3g} (delta {r.privacy['delta']:g})" if r.privacy else ""
            lines.append(f"  {r.round_id:>5} {r.state:<10} {r.opened_block:>6} {_blank(closed):>6} "
                         f"{len(r.submissions):>4} {len(res.merged) if res else '':>6}  "
                         f"{short(res.cid, 22) if res else '':<24} {res.gas if res else '':>8}  {r.status}{eps}")
            for s in r.submissions:
                again = f" -> {s.recomputed}" if s.recomputed and s.recomputed != s.verdict else ""
                size = f"  {s.bytes / 1024:.1f} KiB" if s.bytes is not None else ""
                lines.append(f"  {'':>5} #{s.index:<3} {s.hospital or short(s.node, 10):<12} {s.num_samples:>6} "
                             f"samples  {short(s.cid, 22):<24} {s.gas:>8}  {s.verdict or 'pending'}{again}{size}")
            for f in r.findings:
                lines.append(f"  {'':>5} {f.status}: {f.message}")
            for note in r.notes:
                lines.append(f"  {'':>5} note: {note}")
        lines += ["", f"time: {self.seconds}", self.summary()]
        return "\n".join(lines)


def _blank(value) -> str:
    return "" if value is None else str(value)


def short(value: str, n: int = 14) -> str:
    """`value`, cut to `n` characters with an ellipsis."""
    return value if len(value) <= n else value[:n - 1] + "…"


def indices(numbers) -> str:
    """Submission indices as "#0,#2" ("none" when empty)."""
    return ",".join(f"#{i}" for i in numbers) or "none"
