"""Verification of one submitted update against the chain record, the stored bytes and the round's rules; the checks
that compare the updates of a round with each other are in `fednode.protocol.screening`.

Each rejection has a reason code that goes on-chain in the round's verdicts (0 = merged). The checks added with
rules version 2 (declared sample counts, the metrics document, copies) do not apply to version 1 rounds, so their
histories re-verify as they were."""
from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field, replace

import torch

from ..learning.lora_math import truncate
from ..learning.settings import ADAPTERS, SettingsError
from ..numerics import distance
from ..storage import Storage, StorageError, StorageTooLarge, StorageUnreachable
from ..storage.cid import CIDError, cid_digest, cid_of, normalize_cid
from .documents import DocumentError, ModelCard, UpdateMetrics, fetch_document
from .ledger import ParticipantRecord, Submission
from .encoding import METADATA_KEY as ENCODING_KEY
from .encoding import EncodingError
from .packaging import SHARES_KEY, WEIGHT_KEY, AdapterError, unpack_adapter
from .publish import fetch_named, locate
from .rules import FederationRules
from .secagg.masking import SecureAggregationError, merge_weight
from .secagg.shares import ShareDocument, check_document, fetch_share_document


class Reason(enum.IntEnum):
    ACCEPTED = 0
    NOT_APPROVED = 1      # sender not an approved participant at the submission's block
    REVOKED = 2           # sender revoked before the round was aggregated
    WRONG_ROUND = 3       # the file's metadata names another round (e.g. a replayed old update)
    WRONG_FEDERATION = 4  # the file's metadata names another federation
    WRONG_NODE = 5        # the file's metadata names another node (a copied update)
    WRONG_BASE_MODEL = 6  # trained on another base model
    UNAVAILABLE = 7       # the bytes cannot be fetched from storage
    TOO_LARGE = 8         # over the rules' size bound
    SHA256_MISMATCH = 9   # the bytes' sha256 differs from the on-chain digest
    CID_MISMATCH = 10     # the bytes' CID differs from the on-chain CID digest
    NOT_SAFETENSORS = 11  # not a safetensors file (e.g. a pickle), parsed without executing anything
    BAD_METADATA = 12     # metadata missing or malformed
    SHAPE_MISMATCH = 13   # keys, shapes or dtypes differ from the global adapter's
    NON_FINITE = 14       # NaN or infinity in a tensor
    NORM_TOO_LARGE = 15   # ||update - global|| over the rules' bound
    FROZEN_CHANGED = 16   # a LoRA A matrix differs from the global's although the rules freeze A (FFA-LoRA)
    SAMPLES_OVER_DECLARED = 17  # claims more samples than the training set its model card declared at join
    COPIED = 18           # (near-)identical to an earlier update of the round: a free-rider's copy
    NO_CHANGE = 19        # (near-)equal to the round's start adapter: nothing was trained
    METRICS_UNAVAILABLE = 20  # the update's metrics document cannot be fetched from storage
    BAD_METRICS = 21      # the metrics document does not fit its schema or contradicts the submission
    KEY_NOT_REGISTERED = 22  # secure aggregation: the node had no valid registered key when the round opened
    BAD_SHARES = 23       # secure aggregation: the share document is missing or does not fit the round


UNAVAILABLE_REASONS = (Reason.UNAVAILABLE, Reason.METRICS_UNAVAILABLE)  # availability when aggregated: not
# something a later re-check can judge


@dataclass(frozen=True)
class Verdict:
    submission: Submission
    reason: Reason
    detail: str
    state: dict | None = None  # parsed tensors, only when accepted
    update_norm: float | None = None
    adapter_config: dict | None = None  # the adapter config the update declares, only when accepted
    shares_cid: str | None = None        # secure aggregation: the CID of the update's share document ...
    shares: ShareDocument | None = None  # ... and the document, fetched and checked (only when accepted)

    @property
    def accepted(self) -> bool:
        return self.reason == Reason.ACCEPTED


def update_norm(state: dict, start: dict) -> float:
    """L2 norm of state - start (float64, machine-independent: fednode.numerics)."""
    return distance(state, start)


@dataclass
class RoundContext:
    """What a verifier knows about the round: enough to re-run verification from chain + storage alone."""
    federation_id: str
    round_id: int
    rules: FederationRules
    global_state: dict           # the adapter the round started from
    participants: dict[str, ParticipantRecord]
    as_of_block: int             # revocations at or before this block reject (the aggregation/finalize block)
    cards: dict[str, ModelCard | str] = field(default_factory=dict)  # node -> its model card, or why there is none
    keys: dict[str, bytes] = field(default_factory=dict)  # secure aggregation: the round's participants and keys
    unkeyed: dict[str, str] = field(default_factory=dict)  # ... and why the other active participants are not ones


def check_participant(sub: Submission, ctx: RoundContext) -> Verdict | None:
    p = ctx.participants.get(sub.node)
    if p is None or p.approved_block is None or p.approved_block > sub.block_number \
            or (p.revoked_block is not None and p.revoked_block <= sub.block_number):
        return Verdict(sub, Reason.NOT_APPROVED, f"{sub.node} was not an approved participant at block "
                                                 f"{sub.block_number}")
    if p.revoked_block is not None and p.revoked_block <= ctx.as_of_block:
        return Verdict(sub, Reason.REVOKED, f"{sub.node} was revoked at block {p.revoked_block}")
    return None


def verify_bytes(sub: Submission, data: bytes, ctx: RoundContext) -> Verdict:
    """Every check on the fetched bytes, cheapest first; never executes anything from the file."""
    def reject(reason: Reason, detail: str) -> Verdict:
        return Verdict(sub, reason, detail)

    if len(data) > ctx.rules.max_adapter_bytes:
        return reject(Reason.TOO_LARGE, f"{len(data)} bytes > {ctx.rules.max_adapter_bytes}")
    sha = hashlib.sha256(data).digest()
    if sha != sub.file_sha256:
        return reject(Reason.SHA256_MISMATCH, f"sha256 {sha.hex()[:16]}… != on-chain {sub.file_sha256.hex()[:16]}…")
    actual_cid = cid_of(data)
    if cid_digest(actual_cid) != sub.cid_digest:
        return reject(Reason.CID_MISMATCH, f"CID {actual_cid} does not match the on-chain CID digest")
    try:
        state, meta = unpack_adapter(data, ctx.rules.max_adapter_bytes)
    except AdapterError as exc:
        reason = {"too_large": Reason.TOO_LARGE, "bad_metadata": Reason.BAD_METADATA}.get(
            exc.reason, Reason.NOT_SAFETENSORS)
        return reject(reason, str(exc))
    expected = {"fedchain.federation": ctx.federation_id, "fedchain.round": str(ctx.round_id),
                "fedchain.node": sub.node, "fedchain.base_model": ctx.rules.base_model}
    codes = {"fedchain.federation": Reason.WRONG_FEDERATION, "fedchain.round": Reason.WRONG_ROUND,
             "fedchain.node": Reason.WRONG_NODE, "fedchain.base_model": Reason.WRONG_BASE_MODEL}
    for key, want in expected.items():
        got = meta.get(key)
        if got is None:
            return reject(Reason.BAD_METADATA, f"metadata lacks {key}")
        if got.lower() != want.lower():
            return reject(codes[key], f"{key} is {got!r}, expected {want!r}")
    config = declared_config(meta, ctx.rules)
    if isinstance(config, tuple):
        return reject(*config)
    secure = ctx.rules.secure
    if secure is not None:
        wrong = masked_metadata(sub, meta, ctx)
        if wrong is not None:
            return reject(Reason.BAD_METADATA, wrong)
    start = truncate(ctx.global_state, ctx.rules.lora, config)
    encoding = ctx.rules.update_encoding
    if encoding is not None:  # an encoded delta: decoded to start + delta (float64), then checked like any update
        declared = meta.get(ENCODING_KEY)
        if declared != encoding.declared():
            return reject(Reason.BAD_METADATA, f"{ENCODING_KEY} is {declared!r}, the rules say {encoding.to_json()}")
        try:
            state = encoding.decode(state, start)
        except EncodingError as exc:
            return reject(Reason.SHAPE_MISMATCH, str(exc))
    if sorted(state) != sorted(start):
        missing = sorted(set(start) - set(state))[:2]
        extra = sorted(set(state) - set(start))[:2]
        return reject(Reason.SHAPE_MISMATCH, f"tensor names differ (missing {missing}, unexpected {extra})")
    # masked: integers modulo 2^64 (any value is valid); encoded: decoded to float64; else the start's float32
    dtype = torch.int64 if secure is not None else torch.float64 if encoding is not None else None
    fits = all(state[key].shape == start[key].shape and state[key].dtype == (dtype or start[key].dtype)
               for key in state)
    # float64 squares of finite float32 values cannot overflow, so the norm is finite exactly when every value is
    # (the start adapter being finite): one pass over the update instead of one finiteness test per tensor
    norm = update_norm(state, start) if fits and secure is None else math.nan
    if not fits or (secure is None and not math.isfinite(norm)):
        for key in sorted(state):  # which tensor, the first in name order, and why
            want = start[key]
            if state[key].shape != want.shape or state[key].dtype != (dtype or want.dtype):
                return reject(Reason.SHAPE_MISMATCH, f"{key}: {tuple(state[key].shape)} {state[key].dtype} != "
                                                     f"{tuple(want.shape)} {dtype or want.dtype}")
            if secure is None and not bool(torch.isfinite(state[key]).all()):
                return reject(Reason.NON_FINITE, f"{key} holds NaN or infinity")
    if secure is not None:  # values, norms and frozen tensors are hidden by the masks until the sum
        return Verdict(sub, Reason.ACCEPTED, "masked update", state, None, config, normalize_cid(meta[SHARES_KEY]))
    if ctx.rules.objective.freeze_a:
        changed = next((k for k in sorted(state) if ".lora_A." in k
                       and not torch.equal(state[k], start[k].to(state[k].dtype))), None)
        if changed is not None:
            return reject(Reason.FROZEN_CHANGED, f"{changed} differs from the global adapter's (A is frozen)")
    bound = ctx.rules.norm_bound(sum(t.numel() for t in state.values()))
    if norm > bound:
        return reject(Reason.NORM_TOO_LARGE, f"update norm {norm:.3f} > bound {bound:.6g}")
    return Verdict(sub, Reason.ACCEPTED, f"update norm {norm:.3f}", state, norm, config)


def masked_metadata(sub: Submission, meta: dict, ctx: RoundContext) -> str | None:
    """Why a masked update's metadata does not fit its round (None when it does): its kind, the merge weight its
    deltas were multiplied by (from the on-chain samples) and the CID of its share document."""
    weight = str(merge_weight(ctx.rules.weighting, sub.num_samples))
    if meta.get("fedchain.kind") != "masked_update":
        return f"fedchain.kind is {meta.get('fedchain.kind')!r}, expected 'masked_update' (secure aggregation)"
    if meta.get(WEIGHT_KEY) != weight:
        return f"{WEIGHT_KEY} is {meta.get(WEIGHT_KEY)!r}, the on-chain samples give {weight!r}"
    try:
        normalize_cid(meta.get(SHARES_KEY, ""))
    except CIDError as exc:
        return f"{SHARES_KEY} is not a CID: {exc}"
    return None


def check_key(sub: Submission, ctx: RoundContext) -> Verdict | None:
    """Secure aggregation: the node must be one of the round's participants, with a key registered by then."""
    if ctx.rules.secure is None or sub.node in ctx.keys:
        return None
    why = ctx.unkeyed.get(sub.node, "it was not an active participant when the round opened")
    return Verdict(sub, Reason.KEY_NOT_REGISTERED, f"{sub.node} is not a participant of the masked round: {why}")


def check_shares(verdict: Verdict, store: Storage, ctx: RoundContext) -> Verdict:
    """Secure aggregation: an accepted masked update with its share document (fetched by the CID its metadata
    names, so the update's on-chain sha256 commits to it), which must fit the round; BAD_SHARES otherwise."""
    if ctx.rules.secure is None or not verdict.accepted:
        return verdict
    sub = verdict.submission
    try:
        doc = fetch_share_document(store, verdict.shares_cid)
    except SecureAggregationError as exc:
        return Verdict(sub, Reason.BAD_SHARES, str(exc))
    wrong = check_document(doc, sub.node, ctx.federation_id, ctx.round_id, list(ctx.keys),
                           ctx.rules.secure.shares_needed(len(ctx.keys)))
    if wrong is not None:
        return Verdict(sub, Reason.BAD_SHARES, wrong)
    return replace(verdict, shares=doc)


def declared_config(meta: dict, rules: FederationRules) -> dict | tuple[Reason, str]:
    """The adapter config an update's metadata declares, or why it cannot be merged under the rules: it must be
    the rules' own config, except that lora_exact merges LoRA adapters of any rank up to the global one (and any
    alpha or dropout) on the same modules."""
    try:
        config = json.loads(meta.get("fedchain.peft_config", ""))
        settings = ADAPTERS[rules.adapter].from_json(config)
    except (ValueError, SettingsError) as exc:
        return Reason.BAD_METADATA, f"fedchain.peft_config is not a {rules.adapter} config: {exc}"
    own = rules.adapter_settings
    if settings == own or (rules.adapter == "lora" and replace(settings, dropout=own.dropout) == own):
        return rules.lora
    if rules.aggregation == "lora_exact" and settings.target_modules == own.target_modules and settings.r <= own.r:
        return settings.to_json()
    return Reason.SHAPE_MISMATCH, (f"adapter config {config} differs from the rules' {rules.lora} (only "
                                   f"lora_exact merges other ranks, up to the global one)")


def fetch_submission(sub: Submission, store: Storage, ctx: RoundContext) -> tuple[str, bytes | Verdict]:
    """The CID a submission names and its stored bytes, or the verdict (TOO_LARGE, UNAVAILABLE) when they cannot
    be fetched within the rules' size bound. A store that does not answer at all is no verdict on the update:
    StorageUnreachable is raised."""
    try:
        return fetch_named(store, sub.cid_digest, sub.file_sha256, ctx.rules.max_adapter_bytes)
    except StorageTooLarge as exc:
        return locate(store, sub.cid_digest, sub.file_sha256), Verdict(sub, Reason.TOO_LARGE, str(exc))
    except StorageUnreachable:
        raise
    except StorageError as exc:
        return locate(store, sub.cid_digest, sub.file_sha256), Verdict(sub, Reason.UNAVAILABLE, str(exc))


def check_declared(sub: Submission, ctx: RoundContext) -> Verdict | None:
    """Rules version 2: the sample count a submission claims must not exceed the training-set size its node
    declared in the model card it joined with (the card's digest is on-chain since the join)."""
    if ctx.rules.version < 2:
        return None
    card = ctx.cards.get(sub.node, "no model card was read for it")
    if isinstance(card, str):
        return Verdict(sub, Reason.SAMPLES_OVER_DECLARED, f"no declared training-set size: {card}")
    if sub.num_samples > card.dataset_size:
        return Verdict(sub, Reason.SAMPLES_OVER_DECLARED, f"claims {sub.num_samples} samples, its model card "
                                                          f"declares a training set of {card.dataset_size}")
    return None


def check_metrics(sub: Submission, store: Storage, ctx: RoundContext) -> Verdict | None:
    """Rules version 2: the metrics document is part of the submission: it must be in storage, fit its schema and
    agree with the submission (round, node, samples, and privacy accounting exactly when the rules ask for DP)."""
    if ctx.rules.version < 2:
        return None
    try:
        metrics = fetch_document(store, sub.metrics_digest, UpdateMetrics)
    except DocumentError as exc:
        return Verdict(sub, Reason.METRICS_UNAVAILABLE if exc.missing else Reason.BAD_METRICS, str(exc))
    wrong = [f"{name} is {got!r}, the submission says {want!r}" for name, got, want in (
        ("round", metrics.round, sub.round_id), ("node", metrics.node.lower(), sub.node.lower()),
        ("samples", metrics.samples, sub.num_samples)) if got != want]
    if (metrics.privacy is None) == ctx.rules.private:
        wrong.append("privacy accounting is " + ("missing" if metrics.privacy is None else "given without DP rules"))
    return Verdict(sub, Reason.BAD_METRICS, "metrics " + wrong[0]) if wrong else None


def verify_submission(sub: Submission, store: Storage, ctx: RoundContext) -> Verdict:
    """The verdict on one submission by itself: its sender, its key (secure aggregation), its declared samples, its
    metrics, its bytes and (secure aggregation) its share document."""
    early = (check_participant(sub, ctx) or check_key(sub, ctx) or check_declared(sub, ctx)
             or check_metrics(sub, store, ctx))
    if early is not None:
        return early
    _, fetched = fetch_submission(sub, store, ctx)
    return fetched if isinstance(fetched, Verdict) else check_shares(verify_bytes(sub, fetched, ctx), store, ctx)
