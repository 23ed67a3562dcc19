"""`fedchain audit`, first layer: rebuild a federation's whole history from its chain events alone (participants,
rounds, submissions, verdicts, gas), check the contract's stored commitments and counters against the events,
each round's lineage and its privacy accounting; then, given storage and `verify`, hand every finalized round to
`fednode.audit.reverify`."""
from __future__ import annotations

import json

from web3 import Web3

from chain.clients import Federation, RoundState
from chain.commitments import result_commitment, submission_commitment
from chain.deployment import Deployment
from chain.events import RoundOpened, RulesChanged, record_of
from chain.signing import SignedUpdate, UpdateFields

from ..protocol.ledger import History, Ledger, RoundRecord
from ..protocol.publish import named_cid
from ..protocol.rules import FederationRules
from ..protocol.verify import Reason
from ..storage import Storage
from ..storage.cid import cid_from_digest
from ..timing import Stopwatch
from .report import FAILED, AuditReport, ParticipantAudit, ResultAudit, RoundAudit, Status, SubmissionAudit
from .reverify import reverify_round
from .sources import Sources


class AuditError(ValueError):
    """The audit cannot run as asked (e.g. --verify without storage)."""


def reason_name(code: int) -> str:
    return Reason(code).name if code in Reason._value2member_map_ else f"UNKNOWN({code})"


class Reconstruction:
    """The history read back from the chain, with the gas of every transaction in it."""

    def __init__(self, w3: Web3, deployment: Deployment, sources: Sources, watch: Stopwatch, page: int,
                 ledger: Ledger | None = None):
        self.w3 = w3
        self.fed = Federation(w3, deployment)
        self.ledger = ledger or Ledger(self.fed, page)
        self.sources = sources
        self.watch = watch
        self.gas: dict[str, int] = {}
        self.relays: dict[str, tuple[str, dict[str, dict]]] = {}  # batch tx -> (relayer, node -> signed update)
        self._submissions_read: set[str] = set()  # submission transactions whose calldata was read

    @property
    def history(self) -> History:
        return self.ledger.history

    def read_chain(self) -> int:
        """Read the events not read yet (all of them for a fresh ledger) and the gas of every transaction; the
        last block read."""
        with self.watch("events"):
            self.ledger.refresh()
            for tx in dict.fromkeys(e.tx_hash for e in self.history.events):
                if tx not in self.gas:
                    self.gas[tx] = self.w3.eth.get_transaction_receipt(tx)["gasUsed"]
            for tx in dict.fromkeys(e.tx_hash for e in self.history.events if e.name == "UpdateSubmitted"):
                if tx not in self._submissions_read:
                    self._submissions_read.add(tx)
                    self._read_relay(tx)
        return self.ledger.head

    def _read_relay(self, tx_hash: str) -> None:
        """Keep the signed updates a `submitSignedBatch` transaction carried (its calldata holds the signatures)."""
        tx = self.w3.eth.get_transaction(tx_hash)
        try:
            function, params = self.fed.contract.decode_function_input(tx["input"])
        except ValueError:  # a call the current ABI does not know (an older contract's)
            return
        if function.fn_name == "submitSignedBatch":
            self.relays[tx_hash] = (tx["from"], {Web3.to_checksum_address(u["node"]): dict(u)
                                                 for u in params["updates"]})

    def check_signature(self, sub, sa: SubmissionAudit, ra: RoundAudit) -> None:
        """A relayed update must carry its node's EIP-712 signature over exactly the fields its event records,
        re-checked here with eth-account, independently of the contract."""
        if sub.tx_hash not in self.relays:
            return
        relayer, items = self.relays[sub.tx_hash]
        sa.relayed_by = relayer
        sa.gas = self.gas[sub.tx_hash] // len(items)
        item = items.get(sub.node)
        d = self.fed.deployment
        signer = None if item is None else SignedUpdate(
            d.chain_id, d.address("Federation"), sub.node,
            UpdateFields(ra.round_id, sub.cid_digest, sub.file_sha256, sub.num_samples, sub.metrics_digest),
            item["v"], bytes(item["r"]), bytes(item["s"])).signer()
        if signer != sub.node:
            ra.find(Status.MISMATCH, f"update #{sub.index} from {sub.node} was relayed by {relayer} without "
                                     f"{sub.node}'s signature over its recorded fields")

    def check_lineage(self, rec: RoundRecord, previous: RoundRecord | None, ra: RoundAudit,
                      rules: bytes | None) -> None:
        """The round starts from the previous round's outcome (round 1: the registered initial adapter) under the
        rules in force when it opened (`rules`; None in histories from before rules were registered)."""
        if previous is not None:
            expected, what = previous.next_base, (f"round {previous.round_id}'s "
                                                  f"{'global' if previous.finalized else 'start'} adapter")
        elif self.history.configured is not None:
            c = self.history.configured
            expected, what = (c.cid_digest, c.file_sha256), "the registered initial adapter"
        else:
            expected = None
        if expected is not None and expected != (rec.base_cid_digest, rec.base_sha256):
            ra.find(Status.MISMATCH, f"lineage broken: starts from {ra.base_cid}, not from {what} "
                                     f"{named_cid(*expected)}")
        if rules is not None and rules != rec.rules_digest:
            ra.find(Status.MISMATCH, f"opened under rules {rec.rules_digest.hex()}, not the federation's "
                                     f"{rules.hex()}")
        for change in self.history.rules_changes:
            if (previous.opened_block if previous else 0) < change.block_number <= rec.opened_block:
                ra.notes.append(f"rules changed by admin {change.admin} at block {change.block_number}: "
                                f"{change.previous_digest.hex()} -> {change.rules_digest.hex()}")

    def rules_in_force(self) -> dict[int, bytes]:
        """The federation's rules digest when each round opened, replayed from the events in chain order (empty
        before lineage was recorded on-chain)."""
        current, out = None, {}
        for event in self.history.events:
            record = record_of(event)
            if self.history.configured is not None and record == self.history.configured:
                current = record.rules_digest
            elif isinstance(record, RulesChanged):
                current = record.rules_digest
            elif isinstance(record, RoundOpened) and current is not None:
                out[record.round_id] = current
        return out

    def participants(self) -> list[ParticipantAudit]:
        gas: dict[str, dict[str, int]] = {}
        for e in self.history.events:
            if e.name in ("Joined", "Approved", "Revoked"):
                gas.setdefault(e.args["node"], {})[e.name.lower()] = self.gas[e.tx_hash]
        out = []
        for p in self.history.participants.values():
            card = self.sources.document(p.metadata_digest)
            hospital = card.get("hospital") if card and isinstance(card.get("hospital"), str) else None
            out.append(ParticipantAudit(p.address, hospital, "0x" + p.model_id.hex(),
                                        cid_from_digest(p.metadata_digest, "raw"), p.joined_block, p.approved_block,
                                        p.revoked_block, p.revoke_reason, gas.get(p.address, {}), card))
        return out

    def round(self, rec: RoundRecord, previous: RoundRecord | None, hospitals: dict[str, str | None],
              rules: bytes | None) -> RoundAudit:
        """The round as its events and the contract record it: submissions and their signatures, result,
        lineage, rules (`rules`: the federation's when it opened)."""
        f = rec.finalized
        ra = RoundAudit(rec.round_id, rec.state.name, rec.opener, rec.opened_block, rec.opened_tx,
                        self.gas[rec.opened_tx], rec.deadline, rec.min_updates, rec.allow_below_quorum,
                        named_cid(rec.base_cid_digest, rec.base_sha256), rec.base_sha256.hex(), rec.rules_digest.hex(),
                        cancelled_block=rec.cancelled_block)
        for sub in rec.submissions:
            ra.submissions.append(SubmissionAudit(
                sub.index, sub.node, hospitals.get(sub.node), named_cid(sub.cid_digest, sub.file_sha256),
                sub.file_sha256.hex(), sub.num_samples, cid_from_digest(sub.metrics_digest, "raw"), sub.block_number,
                sub.tx_hash, self.gas[sub.tx_hash],
                verdict=reason_name(f.verdicts[sub.index]) if f and sub.index < len(f.verdicts) else None,
                metrics=self.sources.document(sub.metrics_digest)))
            self.check_signature(sub, ra.submissions[-1], ra)
        if f is not None:
            verdicts = list(f.verdicts)
            ra.result = ResultAudit(f.aggregator, f.block_number, f.tx_hash, self.gas[f.tx_hash],
                                    named_cid(f.cid_digest, f.file_sha256), f.file_sha256.hex(), f.accepted,
                                    verdicts, [i for i, v in enumerate(verdicts) if v == 0])
        self.check_lineage(rec, previous, ra, rules)
        return ra

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
            if stored[sub.node] != submission_commitment(sub.index, sub.cid_digest, sub.file_sha256, sub.num_samples,
                                                         sub.metrics_digest):
                ra.find(Status.MISMATCH, f"submissionOf for update #{sub.index} from {sub.node} differs from its "
                                         "UpdateSubmitted event")
        f = rec.finalized
        if f is None:
            return
        zeros = f.verdicts.count(0)
        if len(f.verdicts) != len(rec.submissions) or f.accepted != zeros or info.accepted != zeros:
            ra.find(Status.MISMATCH, f"{len(f.verdicts)} verdicts with {zeros} merged, but {len(rec.submissions)} "
                                     f"submissions and accepted = {f.accepted}")
        if result != result_commitment(f.cid_digest, f.file_sha256, f.verdicts):
            ra.find(Status.MISMATCH, "resultOf differs from the RoundFinalized event")


def check_privacy(rules: FederationRules, ra: RoundAudit, history: History, cards: dict) -> None:
    """Recompute the epsilon every update of a DP round claims and note any published metrics that claim another:
    hospital-level DP over rounds 1..this one at the rules' delta; record-level DP (DP-SGD) per hospital, over the
    rounds it took part in so far, at the sampling rate its declared training-set size gives."""
    if rules.dp is not None:
        from ..learning.privacy import epsilon

        dp = rules.dp
        eps = epsilon(dp, ra.round_id)
        ra.privacy = {"epsilon": eps, "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
                      "clip_norm": dp.clip_norm, "accountant": "rdp", "rounds": ra.round_id}
        expected = {s.index: eps for s in ra.submissions}
        what = f"after {ra.round_id} rounds at delta {dp.delta:g}"
    elif rules.record_dp is not None:
        dp = rules.record_dp
        expected = {}
        for s in ra.submissions:
            card = cards.get(s.node)
            if isinstance(card, str) or card is None:
                ra.notes.append(f"update #{s.index}: no declared training-set size to recompute its epsilon from")
                continue
            done = sum(any(u.node == s.node for u in r.submissions) for r in history.rounds.values()
                       if r.round_id <= ra.round_id)
            expected[s.index] = dp.epsilon(card.dataset_size, done, rules.rounds)
        ra.privacy = {"epsilon": max(expected.values(), default=0.0), "delta": dp.delta, "mechanism": "dp_sgd",
                      "accountant": "rdp", "per_update": {str(i): e for i, e in expected.items()}}
        what = f"for its participation so far at delta {dp.delta:g}"
    else:
        return
    for s in ra.submissions:
        if s.index not in expected:
            continue
        eps = expected[s.index]
        claimed = (s.metrics or {}).get("privacy", {}).get("epsilon")
        if claimed is None or abs(claimed - eps) > 1e-9 * max(1.0, eps):
            ra.notes.append(f"update #{s.index} metrics claim epsilon {claimed}; the rules give {eps:.4g} {what}")


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


def run_audit(w3: Web3, deployment: Deployment, store: Storage | None = None, verify: bool = False,
              page: int = 2000, ledger: Ledger | None = None) -> AuditReport:
    """Rebuild the federation's history from its events (read `page` blocks at a time) and check it; with
    `verify`, re-run verification and aggregation of every finalized round from `store`. A `ledger` already
    following the federation (the aggregator's, in one process) is brought up to date instead of re-reading."""
    if verify and store is None:
        raise AuditError("verification needs the federation's storage: pass --ipfs ADDR or --store DIR")
    if page < 1:
        raise AuditError(f"page must be at least 1 block, got {page}")
    watch = Stopwatch()
    sources = Sources(store, watch)
    chain = Reconstruction(w3, deployment, sources, watch, page, ledger)
    head = chain.read_chain()
    history = chain.history
    sources.prefetch([p.metadata_digest for p in history.participants.values()]
                     + [r.rules_digest for r in history.rounds.values()]
                     + [s.metrics_digest for r in history.rounds.values() for s in r.submissions])
    participants = chain.participants()
    hospitals = {p.address: p.hospital for p in participants}
    records = [chain.history.rounds[r] for r in sorted(chain.history.rounds)]
    rules_in_force = chain.rules_in_force()
    rounds = []
    for i, rec in enumerate(records):
        ra = chain.round(rec, records[i - 1] if i else None, hospitals, rules_in_force.get(rec.round_id))
        finalized = rec.finalized is not None
        if store is not None:
            rules = sources.rules(rec.rules_digest)
            if isinstance(rules, FederationRules):
                ra.rules = json.loads(rules.to_bytes())
                check_privacy(rules, ra, history, sources.cards(history.participants) if rules.record_dp else {})
            elif not (verify and finalized):  # a finalized round's verification reports it as a finding
                ra.notes.append(rules)
        chain.check_commitments(rec, ra)
        if verify and finalized and len(rec.finalized.verdicts) == len(rec.submissions):
            reverify_round(rec, ra, sources, chain.history, deployment.federation_id)
        ra.status = _status(ra, verify)
        rounds.append(ra)
    return AuditReport(deployment.federation_id, deployment.chain_id, deployment.address("Federation"),
                       deployment.start_block, head, len(chain.history.events), sources.label, verify,
                       participants, rounds, watch.as_dict())
