"""Package adapters into canonical files, publish them to storage, and fetch them back verified."""
from __future__ import annotations

import hashlib
import json

from .adapter import AdapterError, unpack_adapter
from .cid import cid_digest, cid_from_digest, cid_of
from .rules import FederationRules, RulesError, canonical_json
from .storage import Storage, StorageError


class PublishError(RuntimeError):
    """A published object cannot be fetched, or does not match its on-chain digests."""


def locate(store: Storage, cid_digest_: bytes, file_sha256: bytes) -> str:
    """The CID an on-chain (CID digest, sha256) pair names. A single-chunk raw-leaves file's CID digest is its own
    sha256 (raw codec); anything larger is a dag-pb root. Whichever codec the store holds wins, so a submission
    whose two digests disagree is still fetched and then rejected for the mismatch, not as unavailable."""
    guess, other = ("raw", "dag-pb") if cid_digest_ == file_sha256 else ("dag-pb", "raw")
    candidates = [cid_from_digest(cid_digest_, guess), cid_from_digest(cid_digest_, other)]
    return next((cid for cid in candidates if store.has(cid)), candidates[0])


def adapter_metadata(federation_id: str, round_id: int, node: str, base_model: str, lora: dict,
                     kind: str) -> dict[str, str]:
    return {"fedchain.federation": federation_id, "fedchain.round": str(round_id), "fedchain.node": node,
            "fedchain.base_model": base_model, "fedchain.peft_config": json.dumps(lora, sort_keys=True),
            "fedchain.kind": kind}


def publish_bytes(store: Storage, data: bytes) -> tuple[str, bytes, bytes]:
    """Put bytes; returns (cid, cid digest, sha256), checking the store's CID against our own."""
    cid = store.put(data)
    if cid != cid_of(data):
        raise PublishError(f"storage returned CID {cid}, expected {cid_of(data)}")
    return cid, cid_digest(cid), hashlib.sha256(data).digest()


def publish_json(store: Storage, value) -> tuple[str, bytes]:
    """Put a canonical JSON document; returns (cid, digest). Small documents are one raw block, so the digest is
    the sha256 of the bytes."""
    cid, digest, _ = publish_bytes(store, canonical_json(value))
    return cid, digest


def fetch_verified(store: Storage, cid_digest_: bytes, sha256: bytes, max_bytes: int) -> bytes:
    cid = locate(store, cid_digest_, sha256)
    try:
        data = store.get(cid, max_bytes=max_bytes)
    except StorageError as exc:
        raise PublishError(str(exc)) from None
    if hashlib.sha256(data).digest() != sha256:
        raise PublishError(f"{cid}: bytes do not match the on-chain sha256")
    if cid_digest(cid_of(data)) != cid_digest_:
        raise PublishError(f"{cid}: bytes do not match the on-chain CID digest")
    return data


def fetch_adapter(store: Storage, cid_digest_: bytes, sha256: bytes, max_bytes: int, base_model: str):
    """The tensors of an adapter named on-chain, verified against both digests and the base model."""
    data = fetch_verified(store, cid_digest_, sha256, max_bytes)
    try:
        state, meta = unpack_adapter(data, max_bytes)
    except AdapterError as exc:
        raise PublishError(f"{cid_from_digest(cid_digest_, 'raw')}: {exc}") from None
    if meta.get("fedchain.base_model") != base_model:
        raise PublishError(f"adapter {cid_digest_.hex()[:16]}… was built for base model "
                           f"{meta.get('fedchain.base_model')}, not {base_model}")
    return state, meta


def fetch_rules(store: Storage, rules_digest: bytes) -> FederationRules:
    """The rules document a round committed to (a small raw block: its CID digest is its sha256)."""
    data = fetch_verified(store, rules_digest, rules_digest, max_bytes=1 << 20)
    try:
        return FederationRules.from_bytes(data)
    except RulesError as exc:
        raise PublishError(f"rules {rules_digest.hex()[:16]}…: {exc}") from None
