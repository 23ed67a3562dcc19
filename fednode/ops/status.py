"""`fedchain status`: where a running federation stands, read from the chain and storage with no wallet: the current
round and its deadline (local time and how far off), who has submitted, the last finalized global adapter, and
whether the chain and storage answer."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ..protocol.ledger import Ledger
from ..protocol.publish import PublishError, fetch_rules, fetch_verified, named_cid
from ..storage import StorageError
from .participant import Participant
from .service import relative


def local_time(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


@dataclass
class RoundStatus:
    round_id: int
    state: str
    deadline: int
    deadline_local: str
    deadline_relative: str
    submitted: list[str]                 # hospitals (or addresses) that submitted, in chain order
    waiting_for: list[str]               # approved participants that have not
    global_cid: str | None = None


@dataclass
class FederationStatus:
    federation_id: str
    contract: str
    chain: dict                          # rpc, up, block
    storage: dict                        # address, up
    rounds_planned: int | None
    participants: dict[str, int]         # approved, waiting, revoked
    current: RoundStatus | None
    last_finalized: dict | None          # round, global CID
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        up = {True: "up", False: "DOWN"}
        lines = [f"federation {self.federation_id} (contract {self.contract})",
                 f"chain    {self.chain['rpc']}  {up[self.chain['up']]} (block {self.chain['block']})",
                 f"storage  {self.storage['address']}  {up[self.storage['up']]}",
                 "participants " + ", ".join(f"{n} {k}" for k, n in self.participants.items())]
        c = self.current
        if c is None:
            lines.append("no round opened yet")
        else:
            of = f" of {self.rounds_planned}" if self.rounds_planned else ""
            lines.append(f"round {c.round_id}{of}: {c.state}" + (f", deadline {c.deadline_local} ({c.deadline_relative})"
                                                                 if c.state == "OPEN" else ""))
            lines.append(f"  submitted ({len(c.submitted)}): {', '.join(c.submitted) or 'none'}")
            if c.state == "OPEN":
                lines.append(f"  waiting for ({len(c.waiting_for)}): {', '.join(c.waiting_for) or 'none'}")
        f = self.last_finalized
        lines.append(f"last finalized global: round {f['round']}, {f['cid']}" if f else "no round finalized yet")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def federation_status(p: Participant) -> FederationStatus:
    """Read the federation `p`'s config names; storage that does not answer is reported, not raised."""
    fed = p.reader
    history = Ledger(fed).refresh()
    now = fed.next_block_time()
    store, notes = p.store, []
    names: dict[str, str] = {}
    storage_up = True
    for record in history.participants.values():
        try:
            card = json.loads(fetch_verified(store, record.metadata_digest, record.metadata_digest, 1 << 20))
            names[record.address] = card.get("hospital") or record.address
        except (StorageError, PublishError, ValueError) as exc:  # reported, not raised
            storage_up = False
            notes.append(f"model cards unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            break
    approved = [a for a, r in history.participants.items() if r.approved_block and not r.revoked_block]
    counts = {"approved": len(approved),
              "waiting": sum(r.approved_block is None for r in history.participants.values()),
              "revoked": sum(r.revoked_block is not None for r in history.participants.values())}
    rec = history.latest_round()
    current, planned = None, None
    if rec is not None:
        if storage_up:
            try:
                planned = fetch_rules(store, rec.rules_digest).rounds
            except (StorageError, PublishError) as exc:
                notes.append(f"rules unavailable: {str(exc).splitlines()[0]}")
        submitted = [s.node for s in rec.submissions]
        current = RoundStatus(rec.round_id, rec.state.name, rec.deadline, local_time(rec.deadline),
                              relative(rec.deadline, now), [names.get(a, a) for a in submitted],
                              [names.get(a, a) for a in approved if a not in submitted],
                              named_cid(rec.finalized.cid_digest, rec.finalized.file_sha256) if rec.finalized else None)
    finalized = [r for r in history.rounds.values() if r.finalized is not None]
    last = ({"round": finalized[-1].round_id,
             "cid": named_cid(finalized[-1].finalized.cid_digest, finalized[-1].finalized.file_sha256)}
            if finalized else None)
    dep = p.deployment
    return FederationStatus(dep.federation_id, dep.address("Federation"),
                            {"rpc": p.config.chain.rpc, "up": True, "block": fed.w3.eth.block_number},
                            {"address": p.config.storage.ipfs, "up": storage_up}, planned, counts, current, last, notes)
