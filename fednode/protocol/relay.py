"""Updates relayed by the aggregator: a hospital signs its update (EIP-712, no transaction, no ether), publishes the
signed update next to it in storage and hands its CID to the aggregator, which checks every signed update it was
handed and records them all in one `submitSignedBatch` transaction. The contract re-checks each as it would a
direct submission; one it would refuse is left out here, so it cannot sink the batch."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable

from chain.clients import Federation
from chain.errors import ChainError
from chain.signing import SignedUpdate, UpdateFields
from chain.transactions import Receipt

from ..storage import Storage, StorageError
from ..storage.cid import cid_digest
from .documents import MAX_DOCUMENT_BYTES
from .ledger import History, RoundRecord
from .publish import PublishError, fetch_verified, publish_json

Handover = Callable[[str], None]  # hands the CID of a signed-update document to the relay


def hand_over(fed: Federation, store: Storage, fields: UpdateFields, relay: Handover) -> str:
    """Sign `fields` with the node's wallet, publish the signed update and hand its CID to the relay."""
    cid, _ = publish_json(store, fed.sign_update(fields).to_json())
    relay(cid)
    return cid


class Relayer:
    """The aggregator's side: an inbox of signed-update CIDs (thread-safe: an HTTP endpoint may fill it) and the
    batch that records the valid ones."""

    def __init__(self, fed: Federation, store: Storage, log=print):
        self.fed = fed
        self.store = store
        self.log = log
        self._inbox: list[str] = []
        self._lock = threading.Lock()

    def receive(self, cid: str) -> None:
        with self._lock:
            self._inbox.append(cid)

    def flush(self, history: History, rec: RoundRecord) -> Receipt | None:
        """Relay every handed-over update for open round `rec` that the contract would take, in one transaction;
        the others are logged and dropped. None if there was nothing to relay."""
        with self._lock:
            cids, self._inbox = self._inbox, []
        if not cids:
            return None
        batch: dict[str, SignedUpdate] = {}
        submitted = {s.node for s in rec.submissions}
        head = self.fed.w3.eth.block_number
        for cid in cids:
            signed, why = self._read(cid)
            if signed is not None:
                why = self._refusal(signed, rec, history, head, submitted | set(batch))
            if why:
                self.log(f"relay: signed update {cid} left out: {why}")
            else:
                batch[signed.node] = signed
        if not batch:
            return None
        try:
            receipt = self.fed.submit_signed_batch(rec.round_id, list(batch.values()))
        except ChainError as exc:
            self.log(f"relay: batch of {len(batch)} for round {rec.round_id} refused: {exc}")
            return None
        self.log(f"relay: {len(batch)} signed updates recorded in round {rec.round_id} (tx {receipt.tx_hash}, "
                 f"gas {receipt.gas_used:,})")
        return receipt

    def _read(self, cid: str) -> tuple[SignedUpdate | None, str]:
        try:
            digest = cid_digest(cid)
            doc = json.loads(fetch_verified(self.store, digest, digest, MAX_DOCUMENT_BYTES))
            return SignedUpdate.from_json(doc), ""
        except (ValueError, PublishError, StorageError) as exc:
            return None, f"unreadable ({exc})"

    def _refusal(self, signed: SignedUpdate, rec: RoundRecord, history: History, head: int,
                 taken: set[str]) -> str:
        """Why the contract would refuse this signed update now ('' if it would take it)."""
        d = self.fed.deployment
        if (signed.chain_id, signed.federation.lower()) != (d.chain_id, d.address("Federation").lower()):
            return f"signed for federation {signed.chain_id}:{signed.federation}"
        if signed.fields.round_id != rec.round_id:
            return f"signed for round {signed.fields.round_id}, round {rec.round_id} is open"
        if signed.signer() != signed.node:
            return f"the signature is not {signed.node}'s"
        participant = history.participants.get(signed.node)
        if participant is None or not participant.active_at(head):
            return f"{signed.node} is not an approved participant"
        if signed.node in taken:
            return f"{signed.node} already has an update in round {rec.round_id}"
        return ""
