"""Publish packaged bytes to storage under the CID the chain will name, and fetch them back verified against the
on-chain digests."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

from ..canonical import canonical_json
from ..storage import Storage, StorageError, StorageTooLarge, StorageUnreachable
from ..storage.cid import CIDError, cid_digest, cid_from_digest, cid_of, normalize_cid
from .packaging import SERVER_STATE_KEY, AdapterError, unpack_adapter
from .rules import FederationRules, RulesError

MAX_STATE_SLOTS = 2                          # server-state tensors per adapter tensor (FedAdam's m and v)


class PublishError(RuntimeError):
    """A published object cannot be fetched, or does not match its on-chain digests."""


def named_cid(cid_digest_: bytes, file_sha256: bytes) -> str:
    """The CID an on-chain (CID digest, sha256) pair names, without asking a store: a single-chunk raw-leaves
    file's CID digest is its own sha256 (raw codec); anything larger is a dag-pb root."""
    return cid_from_digest(cid_digest_, "raw" if cid_digest_ == file_sha256 else "dag-pb")


def candidates(store: Storage, cid_digest_: bytes, file_sha256: bytes) -> list[str]:
    """The CIDs an on-chain (CID digest, sha256) pair may name in `store`, most likely first: the codec the digests
    imply, then the other one if the store reports having it. A store keyed by multihash (js-ipfs, Kubo) reports
    both, so only fetching tells them apart (`fetch_named`)."""
    guess = named_cid(cid_digest_, file_sha256)
    other = cid_from_digest(cid_digest_, "dag-pb" if cid_digest_ == file_sha256 else "raw")
    held = [cid for cid in (guess, other) if store.has(cid)]
    return held or [guess]


def locate(store: Storage, cid_digest_: bytes, file_sha256: bytes) -> str:
    """The CID an on-chain (CID digest, sha256) pair most likely names in `store`."""
    return candidates(store, cid_digest_, file_sha256)[0]


def fetch_named(store: Storage, cid_digest_: bytes, file_sha256: bytes, max_bytes: int) -> tuple[str, bytes]:
    """The CID and the stored bytes an on-chain digest pair names: the first candidate the store serves, so a
    submission whose two digests disagree is still fetched and then rejected for the mismatch, not as
    unavailable. StorageError (of the first candidate) when none is served; StorageTooLarge and
    StorageUnreachable at once."""
    first: StorageError | None = None
    for cid in candidates(store, cid_digest_, file_sha256):
        try:
            return cid, store.get(cid, max_bytes=max_bytes)
        except (StorageTooLarge, StorageUnreachable):
            raise
        except StorageError as exc:
            first = first or exc
    raise first


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
    """The bytes an on-chain digest pair names, checked against both digests (PublishError); StorageUnreachable
    when the store does not answer at all."""
    try:
        cid, data = fetch_named(store, cid_digest_, sha256, max_bytes)
    except StorageUnreachable:
        raise
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


def fetch_server_state(store: Storage, meta: Mapping[str, str], rules: FederationRules) -> dict | None:
    """The server optimizer state a global adapter's metadata records, checked against its CID: the state a
    round continues from when that adapter is its start. None when none is recorded or it belongs to another
    aggregation rule (the round's rule then starts from zeros)."""
    if SERVER_STATE_KEY not in meta:
        return None
    max_bytes = MAX_STATE_SLOTS * rules.max_adapter_bytes + (1 << 20)  # plus room for the longer header
    try:
        cid = normalize_cid(meta[SERVER_STATE_KEY])
        data = store.get(cid, max_bytes=max_bytes)
        if cid_of(data) != cid:
            raise PublishError(f"server state {cid}: bytes do not match the CID")
        state, state_meta = unpack_adapter(data, max_bytes)
    except (CIDError, StorageError, AdapterError) as exc:
        raise PublishError(f"server state {meta[SERVER_STATE_KEY]!r:.80}: {exc}") from None
    if state_meta.get("fedchain.kind") != "server_state" or state_meta.get("fedchain.base_model") != rules.base_model:
        raise PublishError(f"server state {cid}: not a server state for base model {rules.base_model[:16]}…")
    return state if state_meta.get("fedchain.aggregation") == rules.aggregation else None


def fetch_rules(store: Storage, rules_digest: bytes) -> FederationRules:
    """The rules document a round committed to (a small raw block: its CID digest is its sha256)."""
    data = fetch_verified(store, rules_digest, rules_digest, max_bytes=1 << 20)
    try:
        return FederationRules.from_bytes(data)
    except RulesError as exc:
        raise PublishError(f"rules {rules_digest.hex()[:16]}…: {exc}") from None
