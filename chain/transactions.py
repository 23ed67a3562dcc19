"""Send signed transactions: local signing, nonces tracked for several in flight, receipts with timeouts, and
reverts decoded into one-line ChainErrors."""
from __future__ import annotations

import ast
import contextlib
import threading
import time
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, MethodUnavailable, TransactionNotFound

from .errors import ChainError, decode_revert


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    gas_used: int
    raw: dict

    @property
    def logs(self):
        return self.raw["logs"]


def _revert_data(exc: Exception):
    data = getattr(exc, "data", None)
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        return data
    for arg in exc.args:
        if isinstance(arg, str) and arg.startswith("0x") and len(arg) >= 10:
            return arg
    return None


def _tester_revert_data(exc: Exception) -> bytes | None:
    """eth-tester reports a revert as "execution reverted: b'<raw bytes repr>'"."""
    text = str(exc.args[0]) if exc.args else ""
    prefix = "execution reverted: "
    if type(exc).__name__ == "TransactionFailed" and text.startswith(prefix + "b"):
        try:
            return ast.literal_eval(text[len(prefix):])
        except (ValueError, SyntaxError):
            return None
    return None


def as_chain_error(exc: Exception) -> ChainError:
    if isinstance(exc, ChainError):
        return exc
    if isinstance(exc, (ContractCustomError, ContractLogicError)):
        data = _revert_data(exc)
        if data:
            return decode_revert(data)
        return ChainError(f"reverted: {exc.message if hasattr(exc, 'message') else exc}")
    raw = _tester_revert_data(exc)
    if raw is not None:
        return decode_revert(raw)
    return ChainError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


RESEND_AFTER_S = 5.0  # a sent transaction the node no longer knows (it restarted) is sent again after this


class TxSender:
    """Signs with one account and keeps its nonce, so several transactions can be in flight at once. A transaction
    survives an outage of the node: if the node got it but the answer was lost, it is recognised by its hash; if
    the node lost it (restarted from an older state), the same signed bytes are sent again, so it lands once."""

    def __init__(self, w3: Web3, account: LocalAccount, receipt_timeout: float = 120.0):
        self.w3 = w3
        self.account = account
        self.address = account.address
        self.receipt_timeout = receipt_timeout
        self._nonce: int | None = None
        self._lock = threading.Lock()
        self._chain_id = w3.eth.chain_id
        self._in_flight: dict[str, bytes] = {}  # tx hash -> signed bytes, until mined
        self._pending_estimates = True  # the node estimates on the pending block (eth-tester's provider cannot)

    def _estimate_pending(self, call, params: dict) -> int | None:
        try:
            return call.estimate_gas(params, block_identifier="pending")
        except MethodUnavailable:
            self._pending_estimates = False
            return call.estimate_gas(params)

    def _next_nonce(self) -> int:
        """The next nonce: ours when several are in flight, the chain's when another sender of the same
        account (or a restart) moved it on."""
        pending = self.w3.eth.get_transaction_count(self.address, "pending")
        nonce = pending if self._nonce is None else max(self._nonce, pending)
        self._nonce = nonce + 1
        return nonce

    def _sign_and_send(self, tx: dict) -> str:
        signed = self.account.sign_transaction(tx)
        tx_hash = signed.hash.to_0x_hex()
        try:
            self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            if not self._known(tx_hash):  # a retry after a lost answer is refused, yet the node has it
                self._nonce = None  # resynchronise from the chain next time
                raise as_chain_error(exc) from None
        self._in_flight[tx_hash] = bytes(signed.raw_transaction)
        return tx_hash

    def _known(self, tx_hash: str) -> bool:
        try:
            self.w3.eth.get_transaction(tx_hash)
        except TransactionNotFound:
            return False
        return True

    def transact(self, call, gas: int | None = None, wait: bool = True):
        """Send a contract function call (`contract.functions.f(...)`); returns a Receipt, or the tx hash when
        wait=False. A revert is caught at estimation time and raised as ChainError before any nonce is used; the
        estimate runs on the pending block, whose time is the one the transaction will be mined at (on an idle
        chain the latest block's time is long past)."""
        with self._lock:
            params = {"from": self.address, "chainId": self._chain_id}
            try:
                if gas is not None:
                    params["gas"] = gas
                elif self._pending_estimates:
                    params["gas"] = self._estimate_pending(call, params)
                tx = call.build_transaction(params)
            except Exception as exc:
                raise as_chain_error(exc) from None
            tx["nonce"] = self._next_nonce()
            tx_hash = self._sign_and_send(tx)
        return self.wait(tx_hash) if wait else tx_hash

    def send_value(self, to: str, wei: int) -> Receipt:
        with self._lock:
            tx = {"to": to, "value": wei, "from": self.address, "chainId": self._chain_id, "gas": 21000,
                  "nonce": self._next_nonce(), "maxFeePerGas": 2 * self.w3.eth.gas_price + 10**9,
                  "maxPriorityFeePerGas": 10**9}
            tx_hash = self._sign_and_send(tx)
        return self.wait(tx_hash)

    def wait(self, tx_hash: str) -> Receipt:
        started = last_check = time.monotonic()
        while True:
            try:
                raw = self.w3.eth.get_transaction_receipt(tx_hash)
                break
            except TransactionNotFound:
                pass
            now = time.monotonic()
            if now - started > self.receipt_timeout:
                raise ChainError(f"transaction {tx_hash} not mined within {self.receipt_timeout:.0f} s")
            if now - last_check > RESEND_AFTER_S and tx_hash in self._in_flight:
                last_check = now
                if not self._known(tx_hash):
                    with contextlib.suppress(Exception):  # mined meanwhile (nonce used): the receipt will say
                        self.w3.eth.send_raw_transaction(self._in_flight[tx_hash])
            time.sleep(0.1)
        self._in_flight.pop(tx_hash, None)
        receipt = Receipt(raw["transactionHash"].to_0x_hex(), raw["blockNumber"], raw["gasUsed"], dict(raw))
        if raw["status"] != 1:
            raise self._failure_reason(raw) from None
        return receipt

    def _failure_reason(self, raw) -> ChainError:
        """Replay a mined, reverted transaction to decode its error: in its own block (the block's time, the state
        after it), so a revert caused by an earlier transaction of that block or by its timestamp is found too."""
        tx = self.w3.eth.get_transaction(raw["transactionHash"])
        try:
            self.w3.eth.call({"from": tx["from"], "to": tx["to"], "data": tx["input"], "value": tx["value"]},
                             raw["blockNumber"])
        except Exception as exc:
            return as_chain_error(exc)
        return ChainError(f"transaction {raw['transactionHash'].to_0x_hex()} failed (out of gas?)")
