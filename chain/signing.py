"""EIP-712 signatures of updates: what a hospital signs so that anyone can relay its update (`submitSignedBatch`),
signed and checked with eth-account's typed-data encoding, exactly as the contract hashes them."""
from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import Web3

DOMAIN_NAME, DOMAIN_VERSION = "fedchain Federation", "1"
HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0  # OZ ECDSA's bound on s
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

    def to_json(self) -> dict:
        f = self.fields
        return {"chain_id": self.chain_id, "federation": self.federation, "node": self.node, "round": f.round_id,
                "cid_digest": "0x" + f.cid_digest.hex(), "file_sha256": "0x" + f.file_sha256.hex(),
                "num_samples": f.num_samples, "metrics_digest": "0x" + f.metrics_digest.hex(), "v": self.v,
                "r": "0x" + self.r.hex(), "s": "0x" + self.s.hex()}

    @classmethod
    def from_json(cls, doc: dict) -> "SignedUpdate":
        """Parse a signed-update document (ValueError naming the field if malformed)."""
        def b32(key: str) -> bytes:
            raw = bytes.fromhex(str(doc[key]).removeprefix("0x"))
            if len(raw) != 32:
                raise ValueError(f"{key} must be 32 bytes")
            return raw

        def integer(key: str, bits: int) -> int:
            value = doc[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**bits:
                raise ValueError(f"{key} must be a uint{bits}")
            return value

        try:
            fields = UpdateFields(integer("round", 256), b32("cid_digest"), b32("file_sha256"),
                                  integer("num_samples", 64), b32("metrics_digest"))
            return cls(integer("chain_id", 256), Web3.to_checksum_address(doc["federation"]),
                       Web3.to_checksum_address(doc["node"]), fields, integer("v", 8), b32("r"), b32("s"))
        except KeyError as exc:
            raise ValueError(f"missing field {exc}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None

    def as_call_arg(self) -> tuple:
        """The contract's `SignedUpdate` struct."""
        f = self.fields
        return (self.node, f.cid_digest, f.file_sha256, f.num_samples, f.metrics_digest, self.v, self.r, self.s)

    def message(self):
        """The EIP-712 typed data signed, as eth-account's SignableMessage."""
        return _typed(self.chain_id, self.federation, self.fields)

    def digest(self) -> bytes:
        """The EIP-712 digest signed (the contract's `updateDigest`)."""
        m = self.message()
        return bytes(Web3.keccak(b"\x19" + m.version + m.header + m.body))

    def signer(self) -> str | None:
        """The address the signature recovers to over these fields, or None if it recovers to none or its s is high
        (a malleated copy, which the contract refuses as OZ ECDSA does)."""
        if int.from_bytes(self.s, "big") > HALF_CURVE_ORDER:
            return None
        try:
            return Account.recover_message(self.message(), vrs=(self.v, self.r, self.s))
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
