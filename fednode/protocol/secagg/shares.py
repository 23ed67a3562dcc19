"""The documents of secure aggregation and the Shamir sharing behind them.

- `ShareDocument` (one per hospital and round, published with its masked update, whose metadata names its CID):
  Shamir shares (t of n, over GF(2^128) by pycryptodome, two halves per 256-bit seed) of the hospital's self-mask
  seed and of every pairwise seed it masked with, one bundle per participant, each encrypted with
  ChaCha20-Poly1305 under a key only the dealer and that holder can derive; plus a sha256 commitment to every
  share and every secret, so a revealed share can be checked by anyone and a wrong one is named.
- `SurvivorsDocument` (the aggregator's, digest on-chain in `requestUnmask`): the updates that will be summed.
- `RevealDocument` (one per participant, digest on-chain in `revealShares`): the shares that remove the
  survivors' masks, and no others: the self share of each survivor, the pair shares of each survivor with each
  participant that is not one. The pairwise masks of a survivor with the other survivors cancel in the sum and
  are never revealed, so no single update is ever unmasked."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ...canonical import canonical_json
from ...storage import Storage, StorageError, StorageUnreachable
from ...storage.cid import CHUNK_SIZE, cid_of
from .keys import SEED_BYTES, agreement_key, bundle_key, pair_seed, self_seed
from .masking import SecureAggregationError, apply_mask, pair_sign

MAX_SHARES_BYTES = 16 * 1024 * 1024
MAX_RAW_DOCUMENT = CHUNK_SIZE  # survivors and reveal documents: one raw block, named on-chain by its sha256
SELF = "self"  # the label of the self-mask seed; a pair seed is labelled with the peer's address
HALF = SEED_BYTES // 2


class Bundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    nonce: StrictStr
    ciphertext: StrictStr


class ShareDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    federation: StrictStr
    round: StrictInt
    dealer: StrictStr
    participants: list[StrictStr]               # the round's participants, sorted; holder i gets share i + 1
    threshold: StrictInt
    secrets: dict[str, str]                     # label -> commitment to the secret
    commitments: dict[str, dict[str, str]]      # holder -> label -> commitment to its share
    bundles: dict[str, Bundle]                  # holder -> its shares, encrypted to it


class SurvivorsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    federation: StrictStr
    round: StrictInt
    survivors: dict[str, str]                   # node -> CID of its share document


class RevealDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    federation: StrictStr
    round: StrictInt
    node: StrictStr
    survivors: StrictStr                        # hex sha256 of the survivors document it answers
    shares: dict[str, dict[str, str]]           # dealer -> label -> share (hex)


def _commit(*parts) -> str:
    return hashlib.sha256(canonical_json(["fedchain secagg", *parts])).hexdigest()


def share_commitment(doc: ShareDocument, holder: str, label: str, share: bytes) -> str:
    return _commit(doc.federation.lower(), doc.round, doc.dealer.lower(), holder.lower(), label, share.hex())


def secret_commitment(federation_id: str, round_id: int, dealer: str, label: str, secret: bytes) -> str:
    return _commit(federation_id.lower(), round_id, dealer.lower(), label, secret.hex())


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 256-bit secret: share i (0-based) for holder i, each two GF(2^128) shares."""
    lo, hi = (Shamir.split(threshold, holders, secret[i:i + HALF]) for i in (0, HALF))
    return [a + b for (_, a), (_, b) in zip(lo, hi, strict=True)]


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares by holder position (0-based)."""
    return b"".join(Shamir.combine([(i + 1, s[h:h + HALF]) for i, s in sorted(shares.items())])
                    for h in (0, HALF))


def _aad(federation_id: str, round_id: int, dealer: str, holder: str) -> bytes:
    return canonical_json(["fedchain secagg bundle", federation_id.lower(), round_id, dealer.lower(), holder.lower()])


def deal(own_key, dealer: str, federation_id: str, round_id: int, keys: Mapping[str, bytes], threshold: int,
         secrets: Mapping[str, bytes]) -> ShareDocument:
    """Share `secrets` (label -> 256-bit seed) among the round's participants (`keys`: address -> registered
    key), each holder's shares encrypted to it; `own_key` is the dealer's X25519 private key."""
    holders = sorted(keys, key=str.lower)
    shares = {label: split(secret, threshold, len(holders)) for label, secret in secrets.items()}
    doc = ShareDocument(federation=federation_id, round=round_id, dealer=dealer, participants=holders,
                        threshold=threshold, secrets={}, commitments={}, bundles={})
    commitments, bundles = {}, {}
    for i, holder in enumerate(holders):
        mine = {label: shares[label][i] for label in sorted(shares)}
        commitments[holder] = {label: share_commitment(doc, holder, label, s) for label, s in mine.items()}
        nonce = os.urandom(12)
        plain = canonical_json({label: s.hex() for label, s in mine.items()})
        key = bundle_key(own_key, keys[holder], dealer, holder, federation_id, round_id)
        bundles[holder] = Bundle(nonce=nonce.hex(), ciphertext=ChaCha20Poly1305(key).encrypt(
            nonce, plain, _aad(federation_id, round_id, dealer, holder)).hex())
    return doc.model_copy(update={
        "secrets": {label: secret_commitment(federation_id, round_id, dealer, label, s)
                    for label, s in secrets.items()},
        "commitments": commitments, "bundles": bundles})


def labels_for(dealer: str, participants: list[str]) -> set[str]:
    """What a dealer shares: its self seed and its pair seed with every other participant."""
    return {SELF} | {p.lower() for p in participants if p.lower() != dealer.lower()}


def check_document(doc: ShareDocument, dealer: str, federation_id: str, round_id: int, participants: list[str],
                   threshold: int) -> str | None:
    """Why a share document does not fit its round (None when it does): dealer, round, federation, participants,
    threshold, a bundle and a commitment per holder, commitments to exactly the dealer's secrets."""
    expected = sorted(participants, key=str.lower)
    wrong = [f"{name} is {got!r}, expected {want!r}" for name, got, want in (
        ("federation", doc.federation.lower(), federation_id.lower()), ("round", doc.round, round_id),
        ("dealer", doc.dealer.lower(), dealer.lower()),
        ("participants", [p.lower() for p in doc.participants], [p.lower() for p in expected]),
        ("threshold", doc.threshold, threshold)) if got != want]
    if wrong:
        return "share document " + wrong[0]
    labels = labels_for(dealer, expected)
    if set(doc.secrets) != labels:
        return "share document does not commit to exactly the dealer's self seed and its pair seeds"
    for holder in doc.participants:
        if holder not in doc.bundles or set(doc.commitments.get(holder, {})) != labels:
            return f"share document lacks the bundle or the commitments of {holder}"
    if set(doc.bundles) != set(doc.participants) or set(doc.commitments) != set(doc.participants):
        return "share document has bundles or commitments for non-participants"
    return None


def open_bundle(doc: ShareDocument, own_key, holder: str, dealer_key: bytes) -> dict[str, bytes]:
    """The shares `doc`'s dealer encrypted to `holder`, checked against their commitments."""
    bundle = doc.bundles.get(holder)
    if bundle is None:
        raise SecureAggregationError(f"{doc.dealer}'s share document holds no bundle for {holder}")
    key = bundle_key(own_key, dealer_key, doc.dealer, holder, doc.federation, doc.round)
    try:
        plain = ChaCha20Poly1305(key).decrypt(bytes.fromhex(bundle.nonce), bytes.fromhex(bundle.ciphertext),
                                              _aad(doc.federation, doc.round, doc.dealer, holder))
        shares = {label: bytes.fromhex(s) for label, s in json.loads(plain).items()}
    except (InvalidTag, ValueError) as exc:
        raise SecureAggregationError(f"{doc.dealer}'s bundle for {holder} does not decrypt under their registered "
                                     f"keys ({type(exc).__name__})") from None
    bad = [label for label, s in shares.items() if doc.commitments[holder].get(label) != share_commitment(
        doc, holder, label, s)]
    if bad or set(shares) != set(doc.commitments[holder]):
        raise SecureAggregationError(f"{doc.dealer}'s bundle for {holder} does not match its commitments")
    return shares


def wanted(dealer: str, survivors: list[str], participants: list[str]) -> list[str]:
    """The labels whose shares remove survivor `dealer`'s masks: its self seed and its pairs with non-survivors."""
    alive = {s.lower() for s in survivors}
    return [SELF] + sorted(p.lower() for p in participants if p.lower() not in alive)


def reveal(own_key, holder: str, survivors: SurvivorsDocument, survivors_digest: bytes,
           docs: Mapping[str, ShareDocument], keys: Mapping[str, bytes]) -> tuple[RevealDocument, list[str]]:
    """The reveal document of `holder` for a survivors document, and the dealers whose bundle it could not use."""
    shares, problems = {}, []
    participants = sorted(keys, key=str.lower)
    for dealer in sorted(survivors.survivors, key=str.lower):
        try:
            mine = open_bundle(docs[dealer], own_key, holder, keys[dealer])
        except SecureAggregationError as exc:
            problems.append(str(exc))
            continue
        shares[dealer] = {label: mine[label].hex() for label in wanted(dealer, list(survivors.survivors),
                                                                        participants)}
    return RevealDocument(federation=survivors.federation, round=survivors.round, node=holder,
                          survivors=survivors_digest.hex(), shares=shares), problems


def fetch_share_document(store: Storage, cid: str) -> ShareDocument:
    """A share document by its CID, checked against it (SecureAggregationError; StorageUnreachable passes)."""
    try:
        data = store.get(cid, max_bytes=MAX_SHARES_BYTES)
        if cid_of(data) != cid:
            raise ValueError("bytes do not match the CID")
        return ShareDocument.model_validate_json(data)
    except StorageUnreachable:
        raise
    except (StorageError, ValueError) as exc:
        raise SecureAggregationError(f"share document {cid}: {str(exc)[:200]}") from None


def mask(account: LocalAccount, federation_id: str, round_id: int, keys: Mapping[str, bytes], values: np.ndarray,
         threshold: int) -> tuple[np.ndarray, ShareDocument]:
    """A hospital's quantized `values` with its self mask and a pair mask with every other participant of `keys`
    added (modulo 2^64), and the share document of those masks' seeds."""
    own = agreement_key(account, federation_id)
    seeds = {SELF: self_seed(account, federation_id, round_id)}
    values = apply_mask(values, seeds[SELF], 1)
    for peer, key in keys.items():
        if peer != account.address:
            seeds[peer.lower()] = pair_seed(own, account.address, peer, key, federation_id, round_id)
            values = apply_mask(values, seeds[peer.lower()], pair_sign(account.address, peer))
    return values, deal(own, account.address, federation_id, round_id, keys, threshold, seeds)
