"""Typed clients over the deployed contracts."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from eth_abi import decode
from eth_account.signers.local import LocalAccount
from web3 import Web3

from .compiler import load_artifact
from .deployment import Deployment
from .events import ChainEvent, iter_events
from .signing import SignedUpdate, UpdateFields, sign_update
from .transactions import Receipt, TxSender, as_chain_error


class Status(enum.IntEnum):
    NONE = 0
    PENDING = 1
    APPROVED = 2
    REVOKED = 3


class RoundState(enum.IntEnum):
    NONE = 0
    OPEN = 1
    FINALIZED = 2
    CANCELLED = 3


@dataclass(frozen=True)
class Participant:
    address: str
    model_id: bytes
    metadata_digest: bytes
    status: Status
    joined_block: int
    approved_block: int
    revoked_block: int


@dataclass(frozen=True)
class RoundInfo:
    round_id: int
    deadline: int
    min_updates: int
    submissions: int
    accepted: int
    state: RoundState
    allow_below_quorum: bool
    submissions_closed: bool = False  # survivors fixed for unmasking (secure aggregation)


ROUND_FIELDS = ("uint64", "uint32", "uint32", "uint32", "uint8", "bool", "bool")  # FederationRounds.Round, in order


def _b32(value: bytes | str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected a 32-byte digest, got {len(raw)} bytes")
    return raw


class Federation:
    """One federation's contract, acting as `account` (None for read-only use)."""

    def __init__(self, w3: Web3, deployment: Deployment, account: LocalAccount | None = None):
        self.w3 = w3
        self.deployment = deployment
        self.contract = w3.eth.contract(address=deployment.address("Federation"),
                                        abi=load_artifact("Federation")["abi"])
        self.sender = TxSender(w3, account) if account is not None else None

    @property
    def address(self) -> str:
        if self.sender is None:
            raise ValueError("this Federation client is read-only (no account)")
        return self.sender.address

    def as_account(self, account: LocalAccount) -> "Federation":
        return Federation(self.w3, self.deployment, account)

    def _send(self, call, wait: bool = True):
        if self.sender is None:
            raise ValueError("this Federation client is read-only (no account)")
        return self.sender.transact(call, wait=wait)

    def _view(self, call):
        try:
            return call.call()
        except Exception as exc:
            raise as_chain_error(exc) from None

    # Registry
    def join(self, model_id: bytes, metadata_digest: bytes) -> Receipt:
        return self._send(self.contract.functions.join(_b32(model_id), _b32(metadata_digest)))

    def approve(self, node: str) -> Receipt:
        return self._send(self.contract.functions.approve(Web3.to_checksum_address(node)))

    def revoke(self, node: str, reason: int = 1) -> Receipt:
        return self._send(self.contract.functions.revoke(Web3.to_checksum_address(node), reason))

    def grant_aggregator(self, account: str) -> Receipt:
        role = self._view(self.contract.functions.AGGREGATOR_ROLE())
        return self._send(self.contract.functions.grantRole(role, Web3.to_checksum_address(account)))

    def begin_admin_transfer(self, new_admin: str) -> Receipt:
        """Start handing the admin role to `new_admin`, who may accept it once the contract's delay has passed."""
        return self._send(self.contract.functions.beginDefaultAdminTransfer(Web3.to_checksum_address(new_admin)))

    def accept_admin_transfer(self) -> Receipt:
        return self._send(self.contract.functions.acceptDefaultAdminTransfer())

    def admin(self) -> str:
        return self._view(self.contract.functions.defaultAdmin())

    def participant(self, node: str) -> Participant:
        p = self._view(self.contract.functions.participant(Web3.to_checksum_address(node)))
        return Participant(Web3.to_checksum_address(node), bytes(p[0]), bytes(p[1]), Status(p[2]), p[3], p[4], p[5])

    # Lineage and rules
    def configure(self, initial_cid_digest: bytes, initial_sha256: bytes, rules_digest: bytes) -> Receipt:
        """Register the adapter round 1 starts from and the federation's rules (once, before round 1)."""
        return self._send(self.contract.functions.configure(_b32(initial_cid_digest), _b32(initial_sha256),
                                                            _b32(rules_digest)))

    def change_rules(self, rules_digest: bytes) -> Receipt:
        return self._send(self.contract.functions.changeRules(_b32(rules_digest)))

    def rules_digest(self) -> bytes:
        """The rules the next round must open under (zero before `configure`)."""
        return bytes(self._view(self.contract.functions.rulesDigest()))

    def lineage_head(self) -> tuple[bytes, bytes]:
        """(CID digest, sha256) the next round must start from."""
        cid, sha = self._view(self.contract.functions.lineageHead())
        return bytes(cid), bytes(sha)

    # Rounds
    def open_round(self, base_cid_digest: bytes, base_sha256: bytes, rules_digest: bytes, deadline: int,
                   min_updates: int, allow_below_quorum: bool = True) -> tuple[int, Receipt]:
        receipt = self._send(self.contract.functions.openRound(
            _b32(base_cid_digest), _b32(base_sha256), _b32(rules_digest), deadline, min_updates, allow_below_quorum))
        event = self.contract.events.RoundOpened().process_receipt(receipt.raw)[0]
        return event["args"]["roundId"], receipt

    def submit_update(self, round_id: int, cid_digest: bytes, file_sha256: bytes, num_samples: int,
                      metrics_digest: bytes, wait: bool = True):
        return self._send(self.contract.functions.submitUpdate(
            round_id, _b32(cid_digest), _b32(file_sha256), num_samples, _b32(metrics_digest)), wait=wait)

    def sign_update(self, fields: UpdateFields) -> SignedUpdate:
        """This account's EIP-712 signature of an update, for anyone to relay (no transaction, no ether)."""
        if self.sender is None:
            raise ValueError("this Federation client is read-only (no account)")
        return sign_update(self.sender.account, self.deployment.chain_id, self.contract.address, fields)

    def submit_signed_batch(self, round_id: int, updates: list[SignedUpdate], wait: bool = True):
        """Relay signed updates to round `round_id` in one transaction (paid by this account)."""
        return self._send(self.contract.functions.submitSignedBatch(round_id, [u.as_call_arg() for u in updates]),
                          wait=wait)

    def finalize(self, round_id: int, cid_digest: bytes, file_sha256: bytes, verdicts: bytes) -> Receipt:
        return self._send(self.contract.functions.finalize(round_id, _b32(cid_digest), _b32(file_sha256),
                                                         bytes(verdicts)))

    # Secure aggregation: the unmasking phase
    def request_unmask(self, round_id: int, survivors_digest: bytes) -> Receipt:
        return self._send(self.contract.functions.requestUnmask(round_id, _b32(survivors_digest)))

    def reveal_shares(self, round_id: int, reveal_digest: bytes) -> Receipt:
        return self._send(self.contract.functions.revealShares(round_id, _b32(reveal_digest)))

    def reveal_commitment(self, round_id: int, node: str) -> bytes:
        return bytes(self._view(self.contract.functions.revealOf(round_id, Web3.to_checksum_address(node))))

    def cancel_round(self, round_id: int) -> Receipt:
        return self._send(self.contract.functions.cancelRound(round_id))

    def round_count(self) -> int:
        return self._view(self.contract.functions.roundCount())

    def round(self, round_id: int) -> RoundInfo:
        """The round's on-chain record; a contract deployed before secure aggregation returns one field less (no
        `submissionsClosed`), which reads as False."""
        try:
            data = self.w3.eth.call({"to": self.contract.address,
                                     "data": self.contract.encode_abi("getRound", [round_id])})
        except Exception as exc:
            raise as_chain_error(exc) from None
        r = decode(ROUND_FIELDS[:len(data) // 32], data)
        return RoundInfo(round_id, r[0], r[1], r[2], r[3], RoundState(r[4]), r[5], *r[6:])

    def submission_commitment(self, round_id: int, node: str) -> bytes:
        return bytes(self._view(self.contract.functions.submissionOf(round_id, Web3.to_checksum_address(node))))

    def result_commitment(self, round_id: int) -> bytes:
        return bytes(self._view(self.contract.functions.resultOf(round_id)))

    def chain_time(self) -> int:
        """The latest block's timestamp (it stands still while an idle chain mines nothing)."""
        return self.w3.eth.get_block("latest")["timestamp"]

    def next_block_time(self) -> int:
        """The timestamp the next block will get: the pending block's, which anvil and geth keep at the wall clock,
        so it moves on an idle chain too; never before the latest block's. Deadlines are judged by this clock."""
        return max(self.w3.eth.get_block("pending")["timestamp"], self.chain_time())

    def events(self, from_block: int | None = None, to_block: int | None = None,
               page: int = 2000) -> list[ChainEvent]:
        start = self.deployment.start_block if from_block is None else from_block
        return list(iter_events(self.w3, [self.contract], start, to_block, page))
