"""EIP-712 signatures of updates: what a hospital signs so that anyone can relay its update (`submitSignedBatch`),
signed and checked with eth-account's typed-data encoding, exactly as the contract hashes them."""
from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import Web3

DOMAIN_NAME, DOMAIN_VERSION = "fedchain Federation", "1"
UPDATE_TYPES = {"Update": [
    {"name": "federation", "type": "address"},
    {"name": "round", "type": "uint256"},
    {"name": "cidDigest", "type": "bytes32"},
    {"name": "fileSha256", "type": "bytes32"},
    {"name": "numSamples", "type": "uint64"},
    {"name": "metricsDigest", "type": "bytes32"},
]}


@dataclass(frozen=True)
class UpdateFields:
    """What a node commits to for one round: the same fields a direct submission sends."""

    round_id: int
    cid_digest: bytes
    file_sha256: bytes
    num_samples: int
    metrics_digest: bytes


@dataclass(frozen=True)
class SignedUpdate:
    """An update signed by `node` for the federation at `federation` on chain `chain_id`."""

    chain_id: int
    federation: str
    node: str
    fields: UpdateFields
    v: int
    r: bytes
    s: bytes

    def as_call_arg(self) -> tuple:
        """The contract's `SignedUpdate` struct."""
        f = self.fields
        return (self.node, f.cid_digest, f.file_sha256, f.num_samples, f.metrics_digest, self.v, self.r, self.s)

    def digest(self) -> bytes:
        """The EIP-712 digest signed (the contract's `updateDigest`)."""
        m = _typed(self.chain_id, self.federation, self.fields)
        return bytes(Web3.keccak(b"\x19" + m.version + m.header + m.body))

    def signer(self) -> str | None:
        """The address the signature recovers to over these fields, or None if it recovers to none."""
        try:
            return Account.recover_message(_typed(self.chain_id, self.federation, self.fields),
                                           vrs=(self.v, self.r, self.s))
        except Exception:  # eth-keys refuses v, r or s out of range: no signer
            return None


def _typed(chain_id: int, federation: str, fields: UpdateFields):
    return encode_typed_data(full_message={
        "types": {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                                   {"name": "chainId", "type": "uint256"},
                                   {"name": "verifyingContract", "type": "address"}], **UPDATE_TYPES},
        "primaryType": "Update",
        "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id,
                   "verifyingContract": Web3.to_checksum_address(federation)},
        "message": {"federation": Web3.to_checksum_address(federation), "round": fields.round_id,
                    "cidDigest": fields.cid_digest, "fileSha256": fields.file_sha256,
                    "numSamples": fields.num_samples, "metricsDigest": fields.metrics_digest},
    })


def sign_update(account: LocalAccount, chain_id: int, federation: str, fields: UpdateFields) -> SignedUpdate:
    signed = account.sign_message(_typed(chain_id, federation, fields))
    return SignedUpdate(chain_id, Web3.to_checksum_address(federation), account.address, fields, signed.v,
                        signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))
