"""`fedchain audit`: rebuild a federation's whole history from its chain events alone and, given its storage,
re-check it. Every update and global adapter is fetched and checked against its on-chain digests, every verdict is
re-derived with the aggregator's own verification rules, and every global adapter is recomputed with the round's
committed aggregation rule, packed canonically and compared bit for bit with the finalized one."""
from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from eth_abi import encode as abi_encode
from web3 import Web3

from chain.clients import Federation, RoundState
from chain.deployment import Deployment

from .adapter import unpack_adapter
from .aggregate import AggregateError, WeightedUpdate, strategy_for
from .cid import cid_digest, cid_from_digest, cid_of
from .ledger import History, RoundRecord, Submission
from .publish import PublishError, fetch_adapter, fetch_rules, fetch_server_state, fetch_verified, pack_global
from .rules import FederationRules, RulesError
from .storage import EmbeddedStore, IpfsHttpStore, Storage
from .timing import Stopwatch
from .verify import Reason, RoundContext, Verdict, check_participant, fetch_submission, verify_bytes

MAX_DOCUMENT_BYTES = 1 << 20   # model cards and metrics documents
MAX_EXPLAINED_UPDATES = 16     # a mismatching global is matched against O(n) alternative aggregations up to this


class AuditError(ValueError):
    """The audit cannot run as asked (e.g. --verify without storage)."""


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
    status: Status | None = None     # MISMATCH / UNAVAILABLE when this update fails the audit


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

    @property
    def ok(self) -> bool:
        return not any(r.status in FAILED for r in self.rounds)

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
            return f"audit: {n} round{'s' * (n != 1)} {status}"
        return f"audit: {len(self.rounds)} rounds: " + ", ".join(f"{n} {s}" for s, n in counts.items())

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
                         f"{_short(res.cid, 22) if res else '':<24} {res.gas if res else '':>8}  {r.status}{eps}")
            for s in r.submissions:
                again = f" -> {s.recomputed}" if s.recomputed and s.recomputed != s.verdict else ""
                lines.append(f"  {'':>5} #{s.index:<3} {s.hospital or _short(s.node, 10):<12} {s.num_samples:>6} "
                             f"samples  {_short(s.cid, 22):<24} {s.gas:>8}  {s.verdict or 'pending'}{again}")
            for f in r.findings:
                lines.append(f"  {'':>5} {f.status}: {f.message}")
            for note in r.notes:
                lines.append(f"  {'':>5} note: {note}")
        lines += ["", f"time: {self.seconds}", self.summary()]
        return "\n".join(lines)


def _blank(value) -> str:
    return "" if value is None else str(value)


def _short(value: str, n: int) -> str:
    return value if len(value) <= n else value[:n - 1] + "…"


def _indices(indices) -> str:
    return ",".join(f"#{i}" for i in indices) or "none"


def _reason_name(code: int) -> str:
    return Reason(code).name if code in Reason._value2member_map_ else f"UNKNOWN({code})"


def submission_commitment(sub: Submission) -> bytes:
    """What FederationRounds stores in submissionOf for a submission."""
    return Web3.keccak(abi_encode(["uint32", "bytes32", "bytes32", "uint64", "bytes32"],
                                  [sub.index, sub.cid_digest, sub.file_sha256, sub.num_samples, sub.metrics_digest]))


def result_commitment(cid_digest_: bytes, file_sha256: bytes, verdicts: bytes) -> bytes:
    """What FederationRounds stores in resultOf for a finalized round."""
    return Web3.keccak(abi_encode(["bytes32", "bytes32", "bytes32"],
                                  [cid_digest_, file_sha256, Web3.keccak(verdicts)]))


class _Auditor:
    def __init__(self, w3: Web3, deployment: Deployment, store: Storage | None, page: int):
        self.w3 = w3
        self.fed = Federation(w3, deployment)
        self.deployment = deployment
        self.store = store
        self.page = page
        self.federation_id = f"{deployment.chain_id}:{deployment.address('Federation').lower()}"
        self.watch = Stopwatch()
        self.history = History()
        self.gas: dict[str, int] = {}
        self._rules: dict[bytes, FederationRules | str] = {}
        self._adapters: dict[tuple[bytes, bytes], tuple[dict, dict] | str] = {}

    # chain
    def read_chain(self) -> int:
        with self.watch("events"):
            head = self.w3.eth.block_number
            for event in self.fed.events(to_block=head, page=self.page):
                self.history.apply(event)
            for tx in dict.fromkeys(e.tx_hash for e in self.history.events):
                self.gas[tx] = self.w3.eth.get_transaction_receipt(tx)["gasUsed"]
        return head

    def check_commitments(self, rec: RoundRecord, ra: RoundAudit) -> None:
        """The contract's stored commitments and counters against the ones recomputed from the events."""
        with self.watch("events"):
            info = self.fed.round(rec.round_id)
            stored = {s.node: self.fed.submission_commitment(rec.round_id, s.node) for s in rec.submissions}
            result = self.fed.result_commitment(rec.round_id) if rec.finalized else None
        if info.state != rec.state or info.submissions != len(rec.submissions):
            ra.find(Status.MISMATCH, f"contract state {info.state.name}/{info.submissions} submissions differs from "
                                     f"the events ({rec.state.name}/{len(rec.submissions)})")
        for position, sub in enumerate(rec.submissions):
            if sub.index != position:
                ra.find(Status.MISMATCH, f"update from {sub.node} has index {sub.index}, expected {position}")
            if stored[sub.node] != submission_commitment(sub):
                ra.find(Status.MISMATCH, f"submissionOf for update #{sub.index} from {sub.node} differs from its "
                                         "UpdateSubmitted event")
        f = rec.finalized
        if f is None:
            return
        zeros = f["verdicts"].count(0)
        if len(f["verdicts"]) != len(rec.submissions) or f["accepted"] != zeros or info.accepted != zeros:
            ra.find(Status.MISMATCH, f"{len(f['verdicts'])} verdicts with {zeros} merged, but {len(rec.submissions)} "
                                     f"submissions and accepted = {f['accepted']}")
        if result != result_commitment(f["cidDigest"], f["fileSha256"], f["verdicts"]):
            ra.find(Status.MISMATCH, "resultOf differs from the RoundFinalized event")

    def participants(self) -> list[ParticipantAudit]:
        gas: dict[str, dict[str, int]] = {}
        for e in self.history.events:
            if e.name in ("Joined", "Approved", "Revoked"):
                gas.setdefault(e.args["node"], {})[e.name.lower()] = self.gas[e.tx_hash]
        out = []
        for p in self.history.participants.values():
            card = self.document(p.metadata_digest)
            hospital = card.get("hospital") if card and isinstance(card.get("hospital"), str) else None
            out.append(ParticipantAudit(p.address, hospital, "0x" + p.model_id.hex(),
                                        cid_from_digest(p.metadata_digest, "raw"), p.joined_block, p.approved_block,
                                        p.revoked_block, p.revoke_reason, gas.get(p.address, {}), card))
        return out

    def round(self, rec: RoundRecord, previous: RoundRecord | None, hospitals: dict[str, str | None],
              verify: bool) -> RoundAudit:
        f = rec.finalized
        ra = RoundAudit(rec.round_id, rec.state.name, rec.opener, rec.opened_block, rec.opened_tx,
                        self.gas[rec.opened_tx], rec.deadline, rec.min_updates, rec.allow_below_quorum,
                        _cid_name(rec.base_cid_digest, rec.base_sha256), rec.base_sha256.hex(), rec.rules_digest.hex(),
                        cancelled_block=rec.cancelled_block)
        for sub in rec.submissions:
            ra.submissions.append(SubmissionAudit(
                sub.index, sub.node, hospitals.get(sub.node), _cid_name(sub.cid_digest, sub.file_sha256),
                sub.file_sha256.hex(), sub.num_samples, cid_from_digest(sub.metrics_digest, "raw"), sub.block_number,
                sub.tx_hash, self.gas[sub.tx_hash],
                verdict=_reason_name(f["verdicts"][sub.index]) if f and sub.index < len(f["verdicts"]) else None,
                metrics=self.document(sub.metrics_digest)))
        if f is not None:
            verdicts = list(f["verdicts"])
            ra.result = ResultAudit(f["aggregator"], f["block_number"], f["tx_hash"], self.gas[f["tx_hash"]],
                                    _cid_name(f["cidDigest"], f["fileSha256"]), f["fileSha256"].hex(), f["accepted"],
                                    verdicts, [i for i, v in enumerate(verdicts) if v == 0])
        if previous is not None:
            base = (previous.finalized["cidDigest"], previous.finalized["fileSha256"]) if previous.finalized \
                else (previous.base_cid_digest, previous.base_sha256)
            if base != (rec.base_cid_digest, rec.base_sha256):
                ra.notes.append(f"starts from {ra.base_cid}, not from round {previous.round_id}'s "
                                f"{'global' if previous.finalized else 'start'} adapter {_cid_name(*base)}")
        if self.store is not None:
            rules = self.rules(rec.rules_digest)
            if isinstance(rules, FederationRules):
                ra.rules = json.loads(rules.to_bytes())
                self.check_privacy(rules, ra)
            elif not (verify and f is not None):  # a finalized round's verification reports it as a finding
                ra.notes.append(rules)
        self.check_commitments(rec, ra)
        if verify and f is not None and len(f["verdicts"]) == len(rec.submissions):
            self.verify_round(rec, ra)
        ra.status = _status(ra, verify)
        return ra

    @staticmethod
    def check_privacy(rules: FederationRules, ra: RoundAudit) -> None:
        """Recompute the epsilon every update of a DP round carries (the accountant over rounds 1..this one at the
        rules' delta) and note any published metrics that claim another."""
        dp = rules.dp
        if dp is None:
            return
        from .privacy import epsilon

        eps = epsilon(dp, ra.round_id)
        ra.privacy = {"epsilon": eps, "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
                      "clip_norm": dp.clip_norm, "accountant": "rdp", "rounds": ra.round_id}
        for s in ra.submissions:
            claimed = (s.metrics or {}).get("privacy", {}).get("epsilon")
            if claimed is None or abs(claimed - eps) > 1e-9 * max(1.0, eps):
                ra.notes.append(f"update #{s.index} metrics claim epsilon {claimed}; the rules give {eps:.4g} after "
                                f"{ra.round_id} rounds at delta {dp.delta:g}")

    # storage
    def document(self, digest: bytes) -> dict | None:
        """A small JSON document (model card, metrics) named by its raw CID digest, or None."""
        if self.store is None or digest == bytes(32):
            return None
        with self.watch("fetch"):
            try:
                value = json.loads(fetch_verified(self.store, digest, digest, MAX_DOCUMENT_BYTES))
            except (PublishError, ValueError):
                return None
        return value if isinstance(value, dict) else None

    def rules(self, digest: bytes) -> FederationRules | str:
        """The rules a round committed to, or why they cannot be had."""
        if digest not in self._rules:
            with self.watch("fetch"):
                try:
                    self._rules[digest] = fetch_rules(self.store, digest)
                except PublishError as exc:
                    self._rules[digest] = f"rules {cid_from_digest(digest, 'raw')}: {exc}"
        return self._rules[digest]

    def adapter(self, digest: bytes, sha: bytes, rules: FederationRules) -> tuple[dict, dict] | str:
        """An adapter's tensors and metadata, or why they cannot be had."""
        key = (digest, sha)
        if key not in self._adapters:
            with self.watch("fetch"):
                try:
                    self._adapters[key] = fetch_adapter(self.store, digest, sha, rules.max_adapter_bytes,
                                                        rules.base_model)
                except PublishError as exc:
                    self._adapters[key] = str(exc)
        return self._adapters[key]

    # verification
    def reverify(self, sub: Submission, ctx: RoundContext) -> tuple[Verdict, Verdict, bool]:
        """(verdict the rules give, verdict on the bytes alone, whether the store served the bytes its CID names).
        The bytes are checked even when the sender's status already rejects the update, so that a merged update
        of a revoked node can be recomputed when explaining a mismatching global adapter."""
        early = check_participant(sub, ctx)
        with self.watch("fetch"):
            cid, fetched = fetch_submission(sub, self.store, ctx)
            intact = not isinstance(fetched, Verdict) and cid_of(fetched) == cid
        if isinstance(fetched, Verdict):
            content = fetched
        else:
            with self.watch("verification"):
                content = verify_bytes(sub, fetched, ctx)
        return early or content, content, intact or early is not None

    def verify_round(self, rec: RoundRecord, ra: RoundAudit) -> None:
        rules = self.rules(rec.rules_digest)
        if isinstance(rules, str):
            ra.find(Status.UNAVAILABLE, rules)
            return
        start = self.adapter(rec.base_cid_digest, rec.base_sha256, rules)
        if isinstance(start, str):
            ra.find(Status.UNAVAILABLE, f"start adapter: {start}")
            return
        with self.watch("fetch"):
            try:
                server_state = fetch_server_state(self.store, start[1], rules)
            except PublishError as exc:
                ra.find(Status.UNAVAILABLE, f"start adapter's server optimizer state: {exc}")
                return
        inputs = _Inputs(rules, start[0], server_state, rec.submissions)
        f = rec.finalized
        # the aggregator verified before it sent finalize: a revocation mined before the finalize block binds it
        ctx = RoundContext(self.federation_id, rec.round_id, rules, inputs.start, self.history.participants,
                           f["block_number"] - 1)
        undetermined, excluded = set(), set()
        for sub, sa in zip(rec.submissions, ra.submissions, strict=True):
            verdict, content, determined = self.reverify(sub, ctx)
            sa.recomputed, sa.detail, sa.update_norm = verdict.reason.name, verdict.detail, content.update_norm
            if content.accepted:
                inputs.states[sub.index] = content.state
                inputs.configs[sub.index] = content.adapter_config
            onchain = f["verdicts"][sub.index]
            if verdict.reason == onchain:
                continue
            who = f"update #{sub.index} from {sa.hospital or sub.node}"
            if onchain == Reason.UNAVAILABLE:  # availability at aggregation time cannot be re-checked later
                excluded.add(sub.index)
                ra.notes.append(f"{who} was rejected as UNAVAILABLE at aggregation time; verification now gives "
                                f"{verdict.reason.name}")
            elif not determined:
                undetermined.add(sub.index)
                sa.status = Status.UNAVAILABLE
                served = "the store serves other bytes under this CID: " if content.reason in (
                    Reason.SHA256_MISMATCH, Reason.CID_MISMATCH) else ""
                ra.find(Status.UNAVAILABLE, f"{who} ({sa.cid}): {served}{verdict.detail}; cannot re-check its "
                                            f"on-chain verdict {sa.verdict}")
            else:
                sa.status = Status.MISMATCH
                ra.find(Status.MISMATCH, f"{who}: on-chain verdict {sa.verdict}, verification gives "
                                         f"{verdict.reason.name} ({verdict.detail})")
        missing = undetermined & set(ra.result.merged)
        if missing:
            ra.notes.append(f"global adapter not recomputed: merged update(s) {_indices(sorted(missing))} unavailable")
            return
        accepted = [s.index for s in rec.submissions if s.index not in undetermined | excluded
                    and ra.submissions[s.index].recomputed == Reason.ACCEPTED.name]
        self.recompute(rec, ra, inputs, accepted)

    def recompute(self, rec: RoundRecord, ra: RoundAudit, inputs: _Inputs, accepted: list[int]) -> None:
        """Aggregate the updates verification accepts with the round's rule, pack the result as the aggregator
        must have, and compare it bit for bit with the finalized global adapter."""
        f, res = rec.finalized, ra.result
        if not accepted:
            ra.find(Status.MISMATCH, "no update passes verification, yet the round was finalized")
            return
        res.recomputed_merged = accepted
        with self.watch("recomputation"):
            try:
                merged, data = inputs.aggregate(accepted, self.federation_id, rec.round_id, f["aggregator"])
            except (RulesError, AggregateError) as exc:
                ra.find(Status.UNAVAILABLE, f"cannot apply the round's rules: {exc}")
                return
        res.recomputed_sha256 = hashlib.sha256(data).hexdigest()
        if res.recomputed_sha256 != f["fileSha256"].hex():
            within = self.within_tolerance(rec, inputs, merged, data)
            if within is None:
                ra.find(Status.MISMATCH, self.explain(rec, ra, inputs, merged, data))
            else:
                ra.notes.append(within)
            return
        if cid_digest(cid_of(data)) != f["cidDigest"]:
            ra.find(Status.MISMATCH, f"global adapter bytes match, but its on-chain CID digest is not theirs "
                                     f"({cid_of(data)})")
            return
        with self.watch("fetch"):
            try:
                fetch_verified(self.store, f["cidDigest"], f["fileSha256"], inputs.rules.max_adapter_bytes)
            except PublishError as exc:
                ra.notes.append(f"recomputed global adapter matches its digests, but the stored copy is not "
                                f"available: {exc}")

    def within_tolerance(self, rec: RoundRecord, inputs: _Inputs, merged: dict, data: bytes) -> str | None:
        """For a rule whose result is only reproducible up to floating-point rounding (lora_exact's SVD differs
        between BLAS builds): a note when the finalized adapter has the recomputed metadata and equals the
        recomputation within the rules' declared tolerance; None otherwise (or for a bit-exact rule)."""
        strategy = strategy_for(inputs.rules)
        if not hasattr(strategy, "equivalent"):
            return None
        f = rec.finalized
        with self.watch("fetch"):
            try:
                stored, stored_meta = fetch_adapter(self.store, f["cidDigest"], f["fileSha256"],
                                                    inputs.rules.max_adapter_bytes, inputs.rules.base_model)
            except PublishError:
                return None
        if stored_meta != unpack_adapter(data, len(data))[1]:
            return None
        with self.watch("recomputation"):
            same, error = strategy.equivalent(stored, merged)
        if not same:
            return None
        return (f"global adapter equals the recomputation within the declared tolerance "
                f"{strategy.params['tolerance']:g} (max relative error {error:.1e}; {inputs.rules.aggregation} "
                f"re-factors by SVD, whose last bits differ between BLAS builds)")

    def explain(self, rec: RoundRecord, ra: RoundAudit, inputs: _Inputs, merged: dict, data: bytes) -> str:
        """Why a finalized global adapter differs from the recomputed one: the most-differing tensor, and which
        plausible aggregation it is exactly (the on-chain merged set, the other weighting, one update left out or
        counted twice)."""
        f, res, rules = rec.finalized, ra.result, inputs.rules
        text = f"global adapter {_short(res.cid, 24)} differs from the recomputation"
        with self.watch("fetch"):
            try:
                stored, stored_meta = fetch_adapter(self.store, f["cidDigest"], f["fileSha256"],
                                                    rules.max_adapter_bytes, rules.base_model)
            except PublishError as exc:
                return f"{text}; the finalized adapter itself is unavailable ({exc})"
        difference, tensors_differ = _difference(stored, stored_meta, merged, unpack_adapter(data, len(data))[1])
        text += f": {difference}; recomputed from updates {_indices(res.recomputed_merged)} (on-chain verdicts " \
                f"merged {_indices(res.merged)})"
        if tensors_differ:
            with self.watch("recomputation"):
                match = inputs.matching_aggregation(res.merged, res.recomputed_merged, stored)
            if match:
                text += f"; the finalized adapter is exactly {match}"
        return text


@dataclass
class _Inputs:
    """What a round's aggregation starts from: its rules, start adapter, server optimizer state and the tensors of
    every update whose bytes pass verification (by submission index)."""
    rules: FederationRules
    start: dict
    server_state: dict | None
    submissions: list[Submission]
    states: dict[int, dict] = field(default_factory=dict)
    configs: dict[int, dict] = field(default_factory=dict)  # each update's declared adapter config

    def merge(self, rules: FederationRules, indices: list[int]):
        """The aggregate of the updates at `indices` (repeats count twice) and the strategy that made it."""
        strategy = strategy_for(rules, self.server_state)
        updates = [WeightedUpdate(i, self.submissions[i].num_samples, self.states[i], self.configs[i])
                   for i in indices]
        return strategy.aggregate_train(self.start, updates), strategy

    def aggregate(self, indices: list[int], federation_id: str, round_id: int, aggregator: str
                  ) -> tuple[dict, bytes]:
        """The merged tensors and the canonical global adapter bytes the aggregator must have published."""
        merged, strategy = self.merge(self.rules, indices)
        data, _ = pack_global(federation_id, round_id, aggregator, self.rules, merged, strategy.server_state)
        return merged, data

    def matching_aggregation(self, onchain: list[int], recomputed: list[int], stored: dict) -> str | None:
        rules = self.rules
        tried = {(rules.weighting, tuple(recomputed))}
        for label, weighting, indices in _alternatives(rules, onchain, recomputed):
            if (weighting, tuple(indices)) in tried or not set(indices) <= self.states.keys():
                continue
            tried.add((weighting, tuple(indices)))
            candidate, _ = self.merge(replace(rules, weighting=weighting), indices)
            if all(torch.equal(candidate[k], stored[k]) for k in stored):
                return f"{rules.aggregation} of updates {_indices(indices)} weighted by {weighting} ({label})"
        return None


def _difference(stored: dict, stored_meta: dict, merged: dict, meta: dict) -> tuple[str, bool]:
    """How a stored adapter differs from the recomputed one, and whether its tensors differ."""
    if sorted(stored) != sorted(merged):
        return f"tensor names differ ({len(stored)} stored, {len(merged)} recomputed)", True
    diffs = {k: float(torch.max(torch.abs(stored[k].double() - merged[k].double())))
             if stored[k].shape == merged[k].shape else float("inf") for k in sorted(merged)}
    differing = [k for k, d in diffs.items() if d != 0]
    if differing:
        worst = max(differing, key=lambda k: diffs[k])
        return f"tensor {worst} max |diff| {diffs[worst]:.1e} ({len(differing)}/{len(diffs)} tensors differ)", True
    keys = sorted(k for k in meta.keys() | stored_meta.keys() if meta.get(k) != stored_meta.get(k))
    if keys:
        return f"tensors equal, metadata {keys[0]} is {stored_meta.get(keys[0])!r}, expected {meta.get(keys[0])!r}", \
            False
    return "tensors and metadata equal, but the file is not packed canonically", False


def _alternatives(rules: FederationRules, onchain: list[int], recomputed: list[int]):
    """(label, weighting, indices) of aggregations a dishonest or buggy aggregator plausibly ran instead."""
    other = "uniform" if rules.weighting == "num_samples" else "num_samples"
    yield "the on-chain merged set", rules.weighting, onchain
    yield f"{other} weighting", other, recomputed
    yield f"the on-chain merged set with {other} weighting", other, onchain
    if len(onchain) <= MAX_EXPLAINED_UPDATES:
        for i in onchain:
            if len(onchain) > 1:
                yield f"update #{i} left out", rules.weighting, [j for j in onchain if j != i]
        for i in onchain:
            yield f"update #{i} counted twice", rules.weighting, sorted(onchain + [i])


def _cid_name(digest: bytes, sha: bytes) -> str:
    """The CID an on-chain digest pair names without asking a store: a single-chunk file is one raw block whose
    CID digest is its sha256; anything else is a dag-pb root."""
    return cid_from_digest(digest, "raw" if digest == sha else "dag-pb")


def _status(ra: RoundAudit, verify: bool) -> Status:
    found = {f.status for f in ra.findings}
    for status in FAILED:
        if status in found:
            return status
    if ra.state == RoundState.OPEN.name:
        return Status.OPEN
    if ra.state == RoundState.CANCELLED.name:
        return Status.CANCELLED
    return Status.VERIFIED if verify else Status.CONSISTENT


def storage_label(store: Storage | None) -> str | None:
    if isinstance(store, EmbeddedStore):
        return f"embedded {store.root}"
    if isinstance(store, IpfsHttpStore):
        return f"ipfs {store.address}"
    return None if store is None else type(store).__name__


def run_audit(w3: Web3, deployment: Deployment, store: Storage | None = None, verify: bool = False,
              page: int = 2000) -> AuditReport:
    """Rebuild the federation's history from its events (read `page` blocks at a time) and check it; with
    `verify`, re-run verification and aggregation of every finalized round from `store`."""
    if verify and store is None:
        raise AuditError("verification needs the federation's storage: pass --ipfs ADDR or --store DIR")
    if page < 1:
        raise AuditError(f"page must be at least 1 block, got {page}")
    auditor = _Auditor(w3, deployment, store, page)
    head = auditor.read_chain()
    participants = auditor.participants()
    hospitals = {p.address: p.hospital for p in participants}
    records = [auditor.history.rounds[r] for r in sorted(auditor.history.rounds)]
    rounds = [auditor.round(rec, records[i - 1] if i else None, hospitals, verify) for i, rec in enumerate(records)]
    return AuditReport(auditor.federation_id, deployment.chain_id, deployment.address("Federation"),
                       deployment.start_block, head, len(auditor.history.events), storage_label(store), verify,
                       participants, rounds, auditor.watch.as_dict())


def save_report(report: AuditReport, json_path: Path | None = None, html_path: Path | None = None) -> None:
    """Write the report as JSON and/or as a self-contained HTML page."""
    from .audit_report import render_html

    for path, text in ((json_path, report.to_json), (html_path, lambda: render_html(report))):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text())
