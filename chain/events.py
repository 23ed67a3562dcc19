"""Read the contracts' events, paged by block range, decoded and in chain order."""
from __future__ import annotations

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
