"""Keys bound to identity. A hospital's X25519 key for a federation is derived from its wallet key with HKDF (so a
restarted node has it without keeping another secret), published in the model card it joins with (whose digest
its own join transaction puts on-chain) and signed by the wallet (EIP-191), so nobody, the aggregator included,
can substitute it. Every per-round secret is HKDF output over an X25519 agreement or the wallet key, with the
federation and round as salt: a secret revealed for one round says nothing about another."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

SEED_BYTES = 32


class RegistrationError(ValueError):
    """A registered key that cannot be used (bad signature, malformed, low order)."""


def _hkdf(ikm: bytes, salt: bytes, info: str) -> bytes:
    return HKDF(hashes.SHA256(), SEED_BYTES, salt, info.encode()).derive(ikm)


def round_salt(federation_id: str, round_id: int) -> bytes:
    return hashlib.sha256(f"fedchain secagg {federation_id.lower()} round {round_id}".encode()).digest()


def agreement_key(account: LocalAccount, federation_id: str) -> X25519PrivateKey:
    """The hospital's X25519 private key for one federation."""
    seed = _hkdf(bytes(account.key), federation_id.lower().encode(), "fedchain secagg x25519")
    return X25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def statement(federation_id: str, node: str, public_key: bytes) -> str:
    """The text a wallet signs to register its key for a federation."""
    return (f"fedchain secure aggregation key\nfederation: {federation_id.lower()}\nnode: {node.lower()}\n"
            f"x25519: {public_key.hex()}")


def registration(account: LocalAccount, federation_id: str) -> dict[str, str]:
    """The model card fields that register the account's key: the public key and the wallet's signature."""
    public = public_bytes(agreement_key(account, federation_id))
    signed = account.sign_message(encode_defunct(text=statement(federation_id, account.address, public)))
    return {"secagg_key": public.hex(), "secagg_signature": signed.signature.hex()}


def registered_key(node: str, key_hex: str | None, signature_hex: str | None, federation_id: str) -> bytes:
    """The X25519 public key `node` registered (RegistrationError if it registered none, or its signature is not the
    node's wallet's)."""
    if not key_hex or not signature_hex:
        raise RegistrationError("its model card registers no secure-aggregation key")
    try:
        public = bytes.fromhex(key_hex)
        X25519PublicKey.from_public_bytes(public)
        signer = Account.recover_message(encode_defunct(text=statement(federation_id, node, public)),
                                         signature=bytes.fromhex(signature_hex.removeprefix("0x")))
    except ValueError as exc:
        raise RegistrationError(f"its registered key is malformed: {exc}") from None
    if signer.lower() != node.lower():
        raise RegistrationError(f"its registered key is signed by {signer}, not by the node's wallet")
    return public


def _agreement(own: X25519PrivateKey, peer: bytes) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:  # a low-order point gives the all-zero secret: refused by the library
        raise RegistrationError(f"key agreement failed: {exc}") from None


def pair_seed(own: X25519PrivateKey, own_address: str, peer_address: str, peer_key: bytes, federation_id: str,
              round_id: int) -> bytes:
    """The mask seed two hospitals share for one round (the same from either side)."""
    a, b = sorted((own_address.lower(), peer_address.lower()))
    return _hkdf(_agreement(own, peer_key), round_salt(federation_id, round_id), f"fedchain secagg pair {a} {b}")


def bundle_key(own: X25519PrivateKey, peer_key: bytes, dealer: str, holder: str, federation_id: str,
               round_id: int) -> bytes:
    """The AEAD key of the shares `dealer` encrypts to `holder` for one round."""
    return _hkdf(_agreement(own, peer_key), round_salt(federation_id, round_id),
                 f"fedchain secagg shares {dealer.lower()} to {holder.lower()}")


def self_seed(account: LocalAccount, federation_id: str, round_id: int) -> bytes:
    """The seed of the hospital's self mask for one round."""
    return _hkdf(bytes(account.key), round_salt(federation_id, round_id), "fedchain secagg self mask")


def participant_keys(participants: Mapping, cards: Mapping, federation_id: str, block: int
                     ) -> tuple[dict[str, bytes], dict[str, str]]:
    """A round's participants: every participant active at `block` (the round's opening) whose model card
    registers a key signed by its wallet, in address order, with that key; and why each other active one is not."""
    keys, excluded = {}, {}
    for address in sorted(participants, key=str.lower):
        if not participants[address].active_at(block):
            continue
        card = cards.get(address, "no model card was read for it")
        try:
            if isinstance(card, str):
                raise RegistrationError(card)
            keys[address] = registered_key(address, card.secagg_key, card.secagg_signature, federation_id)
        except RegistrationError as exc:
            excluded[address] = str(exc)
    return keys, excluded
