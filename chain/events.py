"""Read the contracts' events, paged by block range, decoded and in chain order; and the Federation contract's
events as typed records."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from web3 import Web3
from web3.contract import Contract


@dataclass(frozen=True)
class ChainEvent:
    name: str
    args: dict
    block_number: int
    log_index: int
    tx_hash: str
    address: str


def iter_events(w3: Web3, contracts: list[Contract], from_block: int = 0, to_block: int | None = None,
                page: int = 2000) -> Iterator[ChainEvent]:
    """Every event the contracts emitted in [from_block, to_block], one get_logs call per `page` blocks."""
    decoders = {}
    for contract in contracts:
        for event in contract.events:
            abi = event.abi
            topic = Web3.keccak(text=f"{abi['name']}({','.join(i['type'] for i in abi['inputs'])})")
            decoders[(contract.address, topic)] = event
    last = w3.eth.block_number if to_block is None else to_block
    addresses = [c.address for c in contracts]
    start = from_block
    while start <= last:
        end = min(start + page - 1, last)
        logs = w3.eth.get_logs({"address": addresses, "fromBlock": start, "toBlock": end})
        for log in sorted(logs, key=lambda l: (l["blockNumber"], l["logIndex"])):
            event = decoders.get((Web3.to_checksum_address(log["address"]), log["topics"][0]))
            if event is None:
                continue
            decoded = event().process_log(log)
            yield ChainEvent(decoded["event"], dict(decoded["args"]), log["blockNumber"], log["logIndex"],
                             log["transactionHash"].to_0x_hex(), decoded["address"])
        start = end + 1


# ---------------------------------------------------------------- typed records of the Federation contract's events


@dataclass(frozen=True)
class Logged:
    """Where an event was emitted."""

    block_number: int
    tx_hash: str


@dataclass(frozen=True)
class Joined(Logged):
    node: str
    model_id: bytes
    metadata_digest: bytes


@dataclass(frozen=True)
class Approved(Logged):
    node: str
    admin: str


@dataclass(frozen=True)
class Revoked(Logged):
    node: str
    admin: str
    reason: int


@dataclass(frozen=True)
class Configured(Logged):
    by: str
    cid_digest: bytes
    file_sha256: bytes
    rules_digest: bytes


@dataclass(frozen=True)
class RulesChanged(Logged):
    admin: str
    previous_digest: bytes
    rules_digest: bytes


@dataclass(frozen=True)
class RoundOpened(Logged):
    round_id: int
    opener: str
    base_cid_digest: bytes
    base_sha256: bytes
    rules_digest: bytes
    deadline: int
    min_updates: int
    allow_below_quorum: bool


@dataclass(frozen=True)
class UpdateSubmitted(Logged):
    round_id: int
    node: str
    index: int
    cid_digest: bytes
    file_sha256: bytes
    num_samples: int
    metrics_digest: bytes


@dataclass(frozen=True)
class RoundFinalized(Logged):
    round_id: int
    aggregator: str
    cid_digest: bytes
    file_sha256: bytes
    accepted: int
    verdicts: bytes


@dataclass(frozen=True)
class RoundCancelled(Logged):
    round_id: int
    by: str


@dataclass(frozen=True)
class UnmaskRequested(Logged):
    round_id: int
    aggregator: str
    survivors_digest: bytes


@dataclass(frozen=True)
class SharesRevealed(Logged):
    round_id: int
    node: str
    reveal_digest: bytes


RECORDS: dict[str, type[Logged]] = {cls.__name__: cls for cls in (
    Joined, Approved, Revoked, Configured, RulesChanged, RoundOpened, UpdateSubmitted, RoundFinalized, RoundCancelled,
    UnmaskRequested, SharesRevealed)}
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def record_of(event: ChainEvent) -> Logged | None:
    """The typed record of a Federation event (arguments renamed to snake_case, bytes as bytes); None for events
    that are not the federation's own (OpenZeppelin's role events)."""
    cls = RECORDS.get(event.name)
    if cls is None:
        return None
    args = {_SNAKE.sub("_", k).lower(): bytes(v) if isinstance(v, (bytes, bytearray)) else v
            for k, v in event.args.items()}
    return cls(block_number=event.block_number, tx_hash=event.tx_hash, **args)
