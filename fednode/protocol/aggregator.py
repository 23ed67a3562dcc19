"""The aggregator: opens rounds, verifies every submitted update, merges the accepted ones with the round's rule,
publishes the new global adapter and finalizes the round on-chain with a verdict per submission."""
from __future__ import annotations

from dataclasses import dataclass

from chain.clients import Federation
from chain.transactions import Receipt

from ..storage import Storage
from ..storage.caching import CachingStore, prefetch
from ..storage.cid import cid_from_digest
from ..timing import Stopwatch
from .documents import MAX_DOCUMENT_BYTES, ModelCard, read_cards
from .ledger import Ledger, RoundRecord
from .merge import accepted_updates, merge_round
from .packaging import pack_global
from .publish import fetch_adapter, fetch_server_state, publish_bytes, publish_json
from .relay import Relayer
from .rules import FederationRules
from .secagg.keys import participant_keys
from .secagg.shares import SurvivorsDocument
from .secagg.unmask import UnmaskError, load_secure_round
from .screening import screen
from .verify import RoundContext, Verdict, verify_submission


@dataclass(frozen=True)
class RoundResult:
    round_id: int
    verdicts: list[Verdict]
    state: dict
    cid: str
    cid_digest: bytes
    file_sha256: bytes
    receipt: Receipt
    size: int = 0  # bytes of the global adapter file (what each hospital downloads to start the next round)

    @property
    def accepted(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.accepted]


class AggregatorError(RuntimeError):
    """A round cannot be finalized (no accepted update, or the start adapter is unusable)."""


class AwaitingShares(AggregatorError):
    """A securely aggregated round waits for the shares that remove its survivors' masks."""


class Aggregator:
    def __init__(self, fed: Federation, store: Storage, rules: FederationRules, stopwatch: Stopwatch | None = None,
                 log=print):
        self.fed = fed
        self.store = store
        self.rules = rules
        self.federation_id = fed.deployment.federation_id
        self.ledger = Ledger(fed)
        self.stopwatch = stopwatch or Stopwatch()
        self.log = log
        self._rules_published = False
        self._cards: dict[bytes, ModelCard | str] = {}
        self._unmasking: dict[int, list[Verdict]] = {}  # masked rounds' verdicts as of their survivors' fixing
        self._round_keys: dict[int, dict[str, bytes]] = {}  # masked rounds' participants and their keys
        self.relayer = Relayer(fed, store, log)  # signed updates handed over by nodes on the relay path

    def publish_global(self, round_id: int, state: dict, server_state: dict | None = None
                       ) -> tuple[str, bytes, bytes]:
        """Package and publish a global adapter (round 0 = the initial one): (cid, CID digest, sha256)."""
        return self.publish_packed(*pack_global(self.federation_id, round_id, self.fed.address, self.rules, state,
                                                server_state))

    def publish_packed(self, data: bytes, server_state_data: bytes | None = None) -> tuple[str, bytes, bytes]:
        """Publish a packaged global adapter, after the server state file it records."""
        with self.stopwatch("storage"):
            if server_state_data is not None:
                publish_bytes(self.store, server_state_data)
            return publish_bytes(self.store, data)

    def check_quorum(self, min_updates: int) -> None:
        """Refuse a quorum below what the round's rule can merge (Krum needs 2f + 3 updates, ...)."""
        needed = self.rules.strategy().min_updates
        if min_updates < needed:
            raise AggregatorError(f"{self.rules.aggregation} merges at least {needed} updates a round, but the quorum "
                                  f"(min_updates) is {min_updates}: raise min_updates to {needed} or more")

    def open_round(self, base_cid_digest: bytes, base_sha256: bytes, duration_s: int, min_updates: int,
                   allow_below_quorum: bool = True) -> RoundRecord:
        self.check_quorum(min_updates)
        if not self._rules_published:
            with self.stopwatch("storage"):
                publish_bytes(self.store, self.rules.to_bytes())
            self._rules_published = True
        with self.stopwatch("chain"):  # judged by the next block's time: on an idle chain the latest block is old
            self.check_lineage(base_cid_digest, base_sha256)
            deadline = self.fed.next_block_time() + duration_s
            round_id, _ = self.fed.open_round(base_cid_digest, base_sha256, self.rules.digest(), deadline,
                                              min_updates, allow_below_quorum)
            return self.ledger.refresh().rounds[round_id]

    def check_lineage(self, base_cid_digest: bytes, base_sha256: bytes) -> None:
        """Before round 1, register `base` as the initial adapter with these rules; later, refuse rules other than
        the federation's (only an admin changes them, on-chain)."""
        on_chain = self.fed.rules_digest()
        if on_chain == bytes(32):
            self.fed.configure(base_cid_digest, base_sha256, self.rules.digest())
        elif on_chain != self.rules.digest():
            raise AggregatorError(f"the federation's rules on-chain are {on_chain.hex()}, this aggregator's "
                                  f"[federation] section gives {self.rules.digest().hex()}: an admin changes them "
                                  "with `fedchain admin rules --config FILE`")

    def relay(self, rec: RoundRecord) -> None:
        """Record the signed updates nodes handed over for round `rec`, in one transaction."""
        history = self.ledger.refresh()
        self.relayer.flush(history, history.rounds[rec.round_id])

    def ready(self, rec: RoundRecord) -> bool:
        """Every active participant has submitted, or the deadline has passed; signed updates handed over are
        relayed first."""
        with self.stopwatch("chain"):
            self.relay(rec)
            history = self.ledger.refresh()
            rec = history.rounds[rec.round_id]
            head = self.fed.w3.eth.block_number
            active = {a for a, p in history.participants.items() if p.active_at(head)}
            submitted = {s.node for s in rec.submissions}
            return active <= submitted or self.deadline_passed(rec)

    def deadline_passed(self, rec: RoundRecord) -> bool:
        """Whether a block mined now would be past the round's deadline (the clock that does not stall)."""
        return self.fed.next_block_time() > rec.deadline

    def start_adapter(self, rec: RoundRecord) -> tuple[dict, dict[str, str]]:
        """The round's start adapter (the last finalized global one) and its metadata."""
        with self.stopwatch("verification"):
            return fetch_adapter(self.store, rec.base_cid_digest, rec.base_sha256, self.rules.max_adapter_bytes,
                                 self.rules.base_model)

    def verify(self, rec: RoundRecord, start: dict | None = None) -> tuple[dict, list[Verdict]]:
        """The round's start adapter and a verdict for every submission, in submission order."""
        with self.stopwatch("chain"):
            history = self.ledger.refresh()
            rec = history.rounds[rec.round_id]
            # a masked round is judged as of its survivors' fixing: the sum then holds exactly their masks
            as_of = self.fed.w3.eth.block_number if rec.unmask is None else rec.unmask.block_number - 1
        if start is None:
            start, _ = self.start_adapter(rec)
        with self.stopwatch("verification"):
            store = CachingStore(self.store)  # the round's documents at once, in parallel: one timeout for many
            prefetch(store, [cid_from_digest(s.metrics_digest, "raw") for s in rec.submissions]
                     + [cid_from_digest(p.metadata_digest, "raw") for p in history.participants.values()
                        if p.metadata_digest not in self._cards], MAX_DOCUMENT_BYTES)
            cards = read_cards(store, history.participants, self._cards)
            ctx = RoundContext(self.federation_id, rec.round_id, self.rules, start, history.participants, as_of,
                               cards)
            if self.rules.secure is not None:  # fixed when the round opened: kept for its unmasking
                ctx.keys, ctx.unkeyed = participant_keys(history.participants, cards, self.federation_id,
                                                         rec.opened_block)
                self._round_keys[rec.round_id] = ctx.keys
            ordered = sorted(rec.submissions, key=lambda s: s.index)
            verdicts = screen([verify_submission(s, store, ctx) for s in ordered], start, self.rules)
        for v in verdicts:
            status = "accepted" if v.accepted else f"REJECTED {v.reason.name}"
            self.log(f"round {rec.round_id} update #{v.submission.index} from {v.submission.node}: {status} "
                     f"({v.detail})")
        return start, verdicts

    def request_unmask(self, rec: RoundRecord, verdicts: list[Verdict]) -> None:
        """Fix a masked round's survivors (the accepted updates, with their share documents) on-chain, which closes
        it to submissions and asks the participants for their shares."""
        survivors = SurvivorsDocument(federation=self.federation_id, round=rec.round_id, survivors={
            v.submission.node: v.shares_cid for v in verdicts if v.accepted})
        with self.stopwatch("storage"):
            _, digest = publish_json(self.store, survivors.model_dump())
        with self.stopwatch("chain"):
            self.fed.request_unmask(rec.round_id, digest)
        self.log(f"round {rec.round_id}: {len(survivors.survivors)} masked updates fixed as survivors; waiting for "
                 f"the participants' shares")

    def finalize(self, rec: RoundRecord) -> RoundResult:
        with self.stopwatch("chain"):
            self.relay(rec)
        start, start_meta = self.start_adapter(rec)
        rec = self.ledger.refresh().rounds[rec.round_id]
        if rec.unmask is not None and rec.round_id in self._unmasking:  # survivors fixed: the verdicts are too
            verdicts = self._unmasking[rec.round_id]
        else:
            _, verdicts = self.verify(rec, start)
            if rec.unmask is not None:
                self._unmasking[rec.round_id] = verdicts
        accepted = accepted_updates(verdicts, self.rules)
        if not accepted:
            raise AggregatorError(f"round {rec.round_id}: no update passed verification; cancel it after its "
                                  "deadline")
        needed = self.rules.strategy().min_updates
        if len(accepted) < needed:
            raise AggregatorError(f"round {rec.round_id}: {len(accepted)} accepted updates, but "
                                  f"{self.rules.aggregation} merges at least {needed}; cancel it after its deadline")
        if len(accepted) < rec.min_updates and not (rec.allow_below_quorum and self.deadline_passed(rec)):
            raise AggregatorError(f"round {rec.round_id}: {len(accepted)} accepted updates, fewer than its quorum "
                                  f"{rec.min_updates}" + ("; it may close below quorum after its deadline"
                                                         if rec.allow_below_quorum else "; cancel it after its "
                                                                                        "deadline"))
        secure = None
        if self.rules.secure is not None:
            if rec.unmask is None:
                self.request_unmask(rec, verdicts)
                raise AwaitingShares(f"round {rec.round_id}: waiting for the shares that remove the masks")
            with self.stopwatch("storage"):
                try:
                    secure = load_secure_round(self.store, rec, self.rules, verdicts,
                                               list(self._round_keys[rec.round_id]))
                except UnmaskError as exc:
                    raise AggregatorError(f"round {rec.round_id}: {exc}") from None
        with self.stopwatch("storage"):
            previous = fetch_server_state(self.store, start_meta, self.rules)
        with self.stopwatch("aggregation"):
            try:
                merged = merge_round(self.rules, start, previous, accepted, self.federation_id, rec.round_id,
                                     self.fed.address, secure)
            except UnmaskError as exc:
                raise AwaitingShares(f"round {rec.round_id}: {exc}") from None
        for problem in secure.problems if secure is not None else ():
            self.log(f"round {rec.round_id}: {problem}")
        cid, cid_digest, sha = self.publish_packed(merged.data, merged.server_state_data)
        with self.stopwatch("chain"):
            receipt = self.fed.finalize(rec.round_id, cid_digest, sha, bytes(int(v.reason) for v in verdicts))
        self.log(f"round {rec.round_id} finalized: {len(accepted)}/{len(verdicts)} updates merged, global {cid}")
        return RoundResult(rec.round_id, verdicts, merged.state, cid, cid_digest, sha, receipt, len(merged.data))
