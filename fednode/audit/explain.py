"""`fedchain audit --verify`, third layer: when a finalized global adapter differs from its recomputation, say how:
the most-differing tensor, and which plausible aggregation it is exactly (the on-chain merged set, the other
weighting, one update left out or counted twice)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..protocol.ledger import RoundRecord
from ..protocol.merge import MergedRound
from ..protocol.packaging import unpack_adapter
from ..protocol.rules import FederationRules
from .inputs import RoundInputs
from .report import RoundAudit, indices, short
from .sources import Sources

MAX_EXPLAINED_UPDATES = 16     # a mismatching global is matched against O(n) alternative aggregations up to this


def explain(rec: RoundRecord, ra: RoundAudit, inputs: RoundInputs, merged: MergedRound, sources: Sources) -> str:
    """Why the finalized global adapter differs from the recomputed one, as one line."""
    f, res, rules = rec.finalized, ra.result, inputs.rules
    text = f"global adapter {short(res.cid, 24)} differs from the recomputation"
    stored = sources.adapter(f.cid_digest, f.file_sha256, rules)
    if isinstance(stored, str):
        return f"{text}; the finalized adapter itself is unavailable ({stored})"
    difference, tensors_differ = _difference(*stored, merged.state, unpack_adapter(merged.data, len(merged.data))[1])
    text += f": {difference}; recomputed from updates {indices(res.recomputed_merged)} (on-chain verdicts " \
            f"merged {indices(res.merged)})"
    if tensors_differ:
        with sources.watch("recomputation"):
            match = matching_aggregation(inputs, res.merged, res.recomputed_merged, stored[0])
        if match:
            text += f"; the finalized adapter is exactly {match}"
    return text


def matching_aggregation(inputs: RoundInputs, onchain: list[int], recomputed: list[int], stored: dict) -> str | None:
    """The first plausible alternative aggregation whose tensors equal the stored adapter's, described."""
    rules = inputs.rules
    if rules.secure is not None:  # masked updates sum only as the round's survivors, with their own weights
        return None
    tried = {(rules.weighting, tuple(recomputed))}
    for label, weighting, at in _alternatives(rules, onchain, recomputed):
        if (weighting, tuple(at)) in tried or not set(at) <= inputs.content.keys():
            continue
        tried.add((weighting, tuple(at)))
        candidate = inputs.merge(at, replace(rules, weighting=weighting)).state
        if all(torch.equal(candidate[k], stored[k]) for k in stored):
            return f"{rules.aggregation} of updates {indices(at)} weighted by {weighting} ({label})"
    return None


def _difference(stored: dict, stored_meta: dict, merged: dict, meta: dict) -> tuple[str, bool]:
    """How a stored adapter differs from the recomputed one, and whether its tensors differ."""
    if sorted(stored) != sorted(merged):
        return f"tensor names differ ({len(stored)} stored, {len(merged)} recomputed)", True
    diffs = {k: float(torch.max(torch.abs(stored[k].double() - merged[k].double())))
             if stored[k].shape == merged[k].shape else float("inf") for k in sorted(merged)}
    differing = [k for k, d in diffs.items() if d != 0]
    if differing:
        worst = max(differing, key=lambda k: diffs[k])
        return f"tensor {worst} max |diff| {diffs[worst]:.1e} ({len(differing)}/{len(diffs)} tensors differ)", True
    keys = sorted(k for k in meta.keys() | stored_meta.keys() if meta.get(k) != stored_meta.get(k))
    if keys:
        return f"tensors equal, metadata {keys[0]} is {stored_meta.get(keys[0])!r}, expected {meta.get(keys[0])!r}", \
            False
    return "tensors and metadata equal, but the file is not packed canonically", False


def _alternatives(rules: FederationRules, onchain: list[int], recomputed: list[int]):
    """(label, weighting, indices) of aggregations a dishonest or buggy aggregator plausibly ran instead."""
    other = "uniform" if rules.weighting == "num_samples" else "num_samples"
    yield "the on-chain merged set", rules.weighting, onchain
    yield f"{other} weighting", other, recomputed
    yield f"the on-chain merged set with {other} weighting", other, onchain
    if len(onchain) <= MAX_EXPLAINED_UPDATES:
        for i in onchain:
            if len(onchain) > 1:
                yield f"update #{i} left out", rules.weighting, [j for j in onchain if j != i]
        for i in onchain:
            yield f"update #{i} counted twice", rules.weighting, sorted(onchain + [i])
