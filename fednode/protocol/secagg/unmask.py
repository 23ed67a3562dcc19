"""The unmasked sum of a round from its masked updates and the revealed shares alone: what the aggregator merges
and what the audit re-derives, with the same code."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...storage import Storage
from ...strategies.base import WeightedUpdate
from ..documents import DocumentError, fetch_document
from .masking import SecureAggregationError, SecureSettings, apply_mask, dequantize, from_state, pair_sign
from .shares import (MAX_RAW_DOCUMENT, SELF, RevealDocument, ShareDocument, SurvivorsDocument, combine,
                     secret_commitment, share_commitment, wanted)


class UnmaskError(SecureAggregationError):
    """The survivors' masks cannot be removed (too few valid shares, or shares that rebuild another secret)."""


@dataclass(frozen=True)
class SecureRound:
    """A round's unmasking material: its participants (sorted, with registered keys), the survivors, their share
    documents and the reveal documents published so far (in on-chain order)."""
    settings: SecureSettings
    participants: list[str]
    survivors: list[str]
    share_docs: Mapping[str, ShareDocument]
    reveals: Sequence[RevealDocument]
    problems: list[str] = field(default_factory=list)   # shares ignored, and why (filled by `reconstruct`)

    @property
    def threshold(self) -> int:
        return self.settings.shares_needed(len(self.participants))

    def reconstruct(self) -> dict[tuple[str, str], bytes]:
        """Every seed that removes a survivor's masks, rebuilt from the first `threshold` revealed shares (by holder
        position) that match the dealer's commitments; shares that do not are named in `problems`."""
        position = {p.lower(): i for i, p in enumerate(self.participants)}
        secrets = {}
        for dealer in sorted(self.survivors, key=str.lower):
            doc = self.share_docs[dealer]
            for label in wanted(dealer, self.survivors, self.participants):
                valid = {}
                for r in self.reveals:
                    share = r.shares.get(dealer, {}).get(label)
                    if share is None:
                        continue
                    holder = r.node
                    try:
                        raw = bytes.fromhex(share)
                    except ValueError:
                        raw = b""
                    if doc.commitments.get(holder, {}).get(label) != share_commitment(doc, holder, label, raw):
                        self.problems.append(f"{holder} revealed a share of {dealer}'s {label} seed that does not "
                                             f"match {dealer}'s commitment: ignored")
                        continue
                    valid[position[holder.lower()]] = raw
                if len(valid) < self.threshold:
                    raise UnmaskError(f"{len(valid)} valid shares of {dealer}'s {label} seed revealed, "
                                      f"{self.threshold} needed")
                secret = combine(dict(sorted(valid.items())[:self.threshold]))
                if secret_commitment(doc.federation, doc.round, dealer, label, secret) != doc.secrets[label]:
                    raise UnmaskError(f"{dealer}'s shares of its {label} seed do not rebuild the seed it committed to")
                secrets[(dealer, label)] = secret
        return secrets

    def unmasked_sum(self, masked: Mapping[str, np.ndarray]) -> np.ndarray:
        """sum of the survivors' masked vectors minus their self masks and their pair masks with non-survivors,
        modulo 2^64: the sum of their quantized weighted deltas."""
        secrets = self.reconstruct()
        survivors = sorted(self.survivors, key=str.lower)
        total = np.zeros_like(masked[survivors[0]])
        for dealer in survivors:
            total = total + masked[dealer]
        for dealer in survivors:
            total = apply_mask(total, secrets[(dealer, SELF)], -1)
            for peer in wanted(dealer, survivors, self.participants)[1:]:
                total = apply_mask(total, secrets[(dealer, peer)], -pair_sign(dealer, peer))
        return total

    def mean_update(self, updates: Sequence[WeightedUpdate], start: dict) -> WeightedUpdate:
        """The survivors' masked updates turned into one update: start + the weighted mean of their quantized
        deltas, weighted by their total weight."""
        nodes = [u.node for u in updates]
        if sorted(n.lower() for n in nodes) != sorted(s.lower() for s in self.survivors):
            raise UnmaskError("the updates to merge are not exactly the round's survivors")
        weight = sum(u.num_samples for u in updates)
        if weight > self.settings.max_total_weight():
            raise UnmaskError(f"total merge weight {weight} over {self.settings.max_total_weight()}: the sum would not "
                              f"stay exact; lower scale_bits or clip")
        total = self.unmasked_sum({n: from_state(u.state) for n, u in zip(nodes, updates, strict=True)})
        bound = weight * self.settings.clip * 2 ** self.settings.scale_bits
        if total.size and float(np.abs(total.view(np.int64)).max()) > bound:
            raise UnmaskError("the unmasked sum leaves the quantization range: a mask was not removed")
        state = dequantize(total, weight, self.settings, start)
        return WeightedUpdate(min(u.index for u in updates), weight, state)


def load_secure_round(store: Storage, rec, rules, verdicts: Sequence, participants: list[str]) -> SecureRound:
    """A masked round's unmasking material from storage: the survivors document its `requestUnmask` names, the
    share documents of the accepted updates (`verdicts`) and every reveal document logged so far; reveal documents
    that are missing or answer another round are left out and named in `problems`."""
    digest = rec.unmask.survivors_digest
    try:
        survivors = fetch_document(store, digest, SurvivorsDocument, MAX_RAW_DOCUMENT)
    except DocumentError as exc:
        raise UnmaskError(f"survivors document: {exc}") from None
    docs = {v.submission.node: v.shares for v in verdicts if v.accepted}
    named = {v.submission.node: v.shares_cid for v in verdicts if v.accepted}
    if survivors.survivors != named or survivors.round != rec.round_id:
        raise UnmaskError("the survivors document does not name exactly the accepted updates and their shares")
    reveals, problems = [], []
    for event in rec.reveals:
        try:
            doc = fetch_document(store, event.reveal_digest, RevealDocument, MAX_RAW_DOCUMENT)
        except DocumentError as exc:
            problems.append(f"{event.node}'s reveal document: {exc}")
            continue
        if (doc.node.lower(), doc.round, doc.federation.lower(), doc.survivors) != (
                event.node.lower(), rec.round_id, survivors.federation.lower(), digest.hex()):
            problems.append(f"{event.node}'s reveal document answers another node, round or survivors document")
            continue
        reveals.append(doc)
    return SecureRound(rules.secure, participants, list(survivors.survivors), docs, reveals, problems)
