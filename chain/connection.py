"""Chain backends behind one interface: the in-process eth-tester chain or any JSON-RPC URL."""
from __future__ import annotations

import requests
from web3 import Web3

from .outage import DEFAULT_OUTAGE_SECONDS, Outage

EMBEDDED = "embedded"
ANVIL_CHAIN_ID = 31337


class ConnectionError_(RuntimeError):
    """The chain cannot be reached."""


class RetryingHTTPProvider(Web3.HTTPProvider):
    """web3's HTTP provider, riding out an unreachable endpoint (`chain.outage.Outage`). Every request is retried,
    writes included: a transaction that did reach the node is then refused as known or as a used nonce, which
    `chain.transactions.TxSender` resolves by its hash."""

    def __init__(self, endpoint: str, timeout: float, outage: Outage | None = None):
        super().__init__(endpoint, request_kwargs={"timeout": timeout}, exception_retry_configuration=None)
        self.outage = outage  # None: no retries

    def _make_request(self, method, request_data: bytes) -> bytes:
        def once() -> bytes:
            return super(RetryingHTTPProvider, self)._make_request(method, request_data)

        if self.outage is None:
            return once()
        return self.outage.call(once, lambda exc: isinstance(exc, (requests.ConnectionError, requests.Timeout)))


def embedded_backend():
    """eth-tester's py-evm backend, with transactions found by hash through the chain database's index. The
    stock backend scans every block back from the head for each receipt, so a receipt, and `eth_getLogs` (one
    receipt per transaction it reads), cost time proportional to the chain's length."""
    from eth.exceptions import TransactionNotFound as EVMTransactionNotFound
    from eth_tester import PyEVMBackend
    from eth_tester.backends.pyevm.serializers import serialize_transaction, serialize_transaction_receipt
    from eth_tester.exceptions import TransactionNotFound

    class IndexedPyEVMBackend(PyEVMBackend):
        def _locate(self, transaction_hash):
            """(block, transaction, index, pending) of a transaction, from the head block or the hash index."""
            head = self.chain.get_block()
            for index, transaction in enumerate(head.transactions):
                if transaction.hash == transaction_hash:
                    return head, transaction, index, True
            try:
                number, index = self.chain.chaindb.get_transaction_index(transaction_hash)
            except EVMTransactionNotFound:
                raise TransactionNotFound(f"No transaction found for transaction hash: "
                                          f"0x{bytes(transaction_hash).hex()}") from None
            block = self.chain.get_canonical_block_by_number(number)
            return block, block.transactions[index], index, False

        def get_transaction_by_hash(self, transaction_hash):
            return serialize_transaction(*self._locate(transaction_hash))

        def get_transaction_receipt(self, transaction_hash):
            block, transaction, index, pending = self._locate(transaction_hash)
            return serialize_transaction_receipt(block, block.get_receipts(self.chain.chaindb), transaction, index,
                                                 pending, self.chain.get_vm())

    return IndexedPyEVMBackend()


def connect(rpc: str = EMBEDDED, timeout: float = 30.0, outage_seconds: float = DEFAULT_OUTAGE_SECONDS) -> Web3:
    """`embedded` for a fresh in-process chain (eth-tester + py-evm), else an HTTP JSON-RPC URL whose outages of up
    to `outage_seconds` are ridden out (the first contact must succeed)."""
    if rpc == EMBEDDED:
        from eth_tester import EthereumTester
        from web3 import EthereumTesterProvider

        return Web3(EthereumTesterProvider(EthereumTester(embedded_backend())))
    if not rpc.startswith(("http://", "https://")):
        raise ConnectionError_(f"rpc must be 'embedded' or an http(s) JSON-RPC URL, got {rpc!r}")
    provider = RetryingHTTPProvider(rpc, timeout)
    w3 = Web3(provider)
    try:
        w3.eth.chain_id
    except Exception as exc:  # requests/aiohttp errors differ by version; all mean "not reachable"
        raise ConnectionError_(f"cannot reach JSON-RPC endpoint {rpc}: {type(exc).__name__}") from None
    provider.outage = Outage(f"chain RPC {rpc}", budget_s=outage_seconds)
    return w3


def is_embedded(w3: Web3) -> bool:
    return hasattr(w3.provider, "ethereum_tester")


def advance_time(w3: Web3, seconds: int) -> None:
    """Move a development chain's clock forward and mine a block (eth-tester or anvil only)."""
    if is_embedded(w3):
        tester = w3.provider.ethereum_tester
        tester.time_travel(w3.eth.get_block("latest")["timestamp"] + seconds)
        tester.mine_blocks(1)
    elif w3.eth.chain_id == ANVIL_CHAIN_ID:
        w3.provider.make_request("evm_increaseTime", [seconds])
        w3.provider.make_request("evm_mine", [])
    else:
        raise ConnectionError_("advance_time works only on a development chain (embedded or anvil)")
