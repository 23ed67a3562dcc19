"""`fedchain audit --verify`, second layer: re-run a finalized round from the chain and storage alone. Every update is
fetched and re-verified with the aggregator's own rules (`fednode.protocol.verify`), and the global adapter is
recomputed with the aggregator's own merge (`fednode.protocol.merge.merge_round`) and compared bit for bit with
the finalized one (within the declared tolerance for a rule that is not bit-portable)."""
from __future__ import annotations

import hashlib

from ..protocol.ledger import History, RoundRecord, Submission
from ..protocol.merge import MergedRound
from ..protocol.packaging import unpack_adapter
from ..protocol.publish import PublishError
from ..protocol.rules import RulesError
from ..protocol.screening import screen
from ..protocol.secagg.keys import participant_keys
from ..protocol.secagg.unmask import UnmaskError, load_secure_round
from ..protocol.verify import (UNAVAILABLE_REASONS, Reason, RoundContext, Verdict, check_declared, check_key,
                               check_metrics, check_participant, check_shares, fetch_submission, verify_bytes)
from ..storage import StorageUnreachable
from ..storage.cid import cid_digest, cid_of
from ..strategies.base import AggregateError
from .explain import explain
from .inputs import RoundInputs
from .report import RoundAudit, Status, indices
from .sources import Sources


def reverify_submission(sub: Submission, ctx: RoundContext, sources: Sources
                        ) -> tuple[Verdict, Verdict, bool, int | None]:
    """(verdict the rules give on the submission by itself, verdict on its bytes alone, whether the verdict is
    determined: not UNAVAILABLE, and the store served the bytes its CID names; the size of the bytes fetched,
    None when none were). The bytes are checked even when
    an earlier check already rejects the update, so that a merged update of a revoked node can be recomputed when
    explaining a mismatching global adapter."""
    with sources.watch("fetch"):
        try:
            early = (check_participant(sub, ctx) or check_key(sub, ctx) or check_declared(sub, ctx)
                     or check_metrics(sub, sources.store, ctx))
        except StorageUnreachable as exc:
            early = Verdict(sub, Reason.METRICS_UNAVAILABLE, str(exc))
        try:
            cid, fetched = fetch_submission(sub, sources.store, ctx)
        except StorageUnreachable as exc:
            cid, fetched = "", Verdict(sub, Reason.UNAVAILABLE, str(exc))
        intact = not isinstance(fetched, Verdict) and cid_of(fetched) == cid
    size = None if isinstance(fetched, Verdict) else len(fetched)
    if isinstance(fetched, Verdict):
        content = fetched
    else:
        with sources.watch("verification"):
            try:
                content = check_shares(verify_bytes(sub, fetched, ctx), sources.store, ctx)
            except StorageUnreachable as exc:
                content, intact = Verdict(sub, Reason.UNAVAILABLE, f"share document: {exc}"), False
    if early is not None:
        return early, content, early.reason not in UNAVAILABLE_REASONS, size
    return content, content, intact, size


def reverify_round(rec: RoundRecord, ra: RoundAudit, sources: Sources, history: History,
                   federation_id: str) -> None:
    rules = sources.rules(rec.rules_digest)
    if isinstance(rules, str):
        ra.find(Status.UNAVAILABLE, rules)
        return
    start = sources.adapter(rec.base_cid_digest, rec.base_sha256, rules)
    if isinstance(start, str):
        ra.find(Status.UNAVAILABLE, f"start adapter: {start}")
        return
    try:
        server_state = sources.server_state(start[1], rules)
    except PublishError as exc:
        ra.find(Status.UNAVAILABLE, f"start adapter's server optimizer state: {exc}")
        return
    f = rec.finalized
    inputs = RoundInputs(rules, start[0], server_state, rec.submissions, federation_id, rec.round_id, f.aggregator)
    # the aggregator verified before it sent finalize (a masked round: before it fixed the survivors), so a
    # revocation mined before that block binds it
    as_of = (f.block_number if rec.unmask is None else rec.unmask.block_number) - 1
    cards = sources.cards(history.participants)
    ctx = RoundContext(federation_id, rec.round_id, rules, inputs.start, history.participants, as_of, cards)
    if rules.secure is not None:
        ctx.keys, ctx.unkeyed = participant_keys(history.participants, cards, federation_id, rec.opened_block)
    now, undetermined, excluded = [], set(), set()  # per position: (verdict now, verdict for screening, content)
    for sub, sa in zip(rec.submissions, ra.submissions, strict=True):
        verdict, content, determined, sa.bytes = reverify_submission(sub, ctx, sources)
        if content.accepted:
            inputs.content[sub.index] = content
        onchain, screened_as = f.verdicts[sub.index], verdict
        if onchain in UNAVAILABLE_REASONS and verdict.reason != onchain:  # availability then cannot be re-checked
            excluded.add(sub.index)
            screened_as = Verdict(sub, Reason(onchain), verdict.detail)  # the aggregator did not have it
        elif not determined and verdict.reason != onchain:
            undetermined.add(sub.index)
        now.append((verdict, screened_as, content))
    screening = [v for _, v, _ in now]
    if not undetermined & set(ra.result.merged):  # else a merged update is missing: screening cannot be redone
        screening = screen(screening, inputs.start, rules)
    for pos, ((verdict, _, content), sa, sub) in enumerate(zip(now, ra.submissions, rec.submissions, strict=True)):
        if sub.index not in excluded:
            verdict = screening[pos]
        sa.recomputed, sa.detail, sa.update_norm = verdict.reason.name, verdict.detail, content.update_norm
        onchain = f.verdicts[sub.index]
        who = f"update #{sub.index} from {sa.hospital or sub.node}"
        if sub.index in excluded:
            ra.notes.append(f"{who} was rejected as {Reason(onchain).name} at aggregation time; verification now "
                            f"gives {verdict.reason.name}")
        elif verdict.reason == onchain:
            continue
        elif sub.index in undetermined:
            sa.status = Status.UNAVAILABLE
            served = "the store serves other bytes under this CID: " if content.reason in (
                Reason.SHA256_MISMATCH, Reason.CID_MISMATCH) else ""
            ra.find(Status.UNAVAILABLE, f"{who} ({sa.cid}): {served}{verdict.detail}; cannot re-check its "
                                        f"on-chain verdict {sa.verdict}")
        else:
            sa.status = Status.MISMATCH
            ra.find(Status.MISMATCH, f"{who}: on-chain verdict {sa.verdict}, verification gives "
                                     f"{verdict.reason.name} ({verdict.detail})")
    missing = undetermined & set(ra.result.merged)
    if missing:
        ra.notes.append(f"global adapter not recomputed: merged update(s) {indices(sorted(missing))} unavailable")
        return
    accepted = [s.index for s in rec.submissions if s.index not in undetermined | excluded
                and ra.submissions[s.index].recomputed == Reason.ACCEPTED.name]
    if rules.secure is not None and not unmasking(rec, ra, inputs, accepted, list(ctx.keys), sources):
        return
    recompute(rec, ra, inputs, accepted, sources)


def unmasking(rec: RoundRecord, ra: RoundAudit, inputs: RoundInputs, accepted: list[int], participants: list[str],
              sources: Sources) -> bool:
    """A masked round: its unmasking material from the chain and storage alone (survivors, share documents,
    reveal documents); whether the sum can be recomputed. Shares that do not match their commitments are named."""
    if rec.unmask is None:
        ra.find(Status.MISMATCH, "the round is securely aggregated, but its survivors were never fixed on-chain")
        return False
    with sources.watch("fetch"):
        try:
            inputs.secure = load_secure_round(sources.store, rec, inputs.rules, [inputs.content[i] for i in accepted],
                                              participants)
            inputs.secure.reconstruct()
        except UnmaskError as exc:
            ra.find(Status.MISMATCH, f"the survivors' masks cannot be removed from what the chain and storage hold: "
                                     f"{exc}")
            return False
        except StorageUnreachable as exc:
            ra.find(Status.UNAVAILABLE, f"unmasking material: {exc}")
            return False
    ra.notes.extend(sorted(set(inputs.secure.problems)))
    return True


def recompute(rec: RoundRecord, ra: RoundAudit, inputs: RoundInputs, accepted: list[int], sources: Sources) -> None:
    """Aggregate the updates verification accepts with the round's rule, pack the result as the aggregator must
    have, and compare it bit for bit with the finalized global adapter."""
    f, res = rec.finalized, ra.result
    if not accepted:
        ra.find(Status.MISMATCH, "no update passes verification, yet the round was finalized")
        return
    res.recomputed_merged = accepted
    with sources.watch("recomputation"):
        try:
            merged = inputs.merge(accepted)
        except (RulesError, AggregateError) as exc:
            ra.find(Status.UNAVAILABLE, f"cannot apply the round's rules: {exc}")
            return
    res.recomputed_sha256 = hashlib.sha256(merged.data).hexdigest()
    if res.recomputed_sha256 != f.file_sha256.hex():
        within = within_tolerance(rec, inputs, merged, sources)
        if within is None:
            ra.find(Status.MISMATCH, explain(rec, ra, inputs, merged, sources))
        else:
            ra.notes.append(within)
        return
    if cid_digest(cid_of(merged.data)) != f.cid_digest:
        ra.find(Status.MISMATCH, f"global adapter bytes match, but its on-chain CID digest is not theirs "
                                 f"({cid_of(merged.data)})")
        return
    try:
        sources.verified(f.cid_digest, f.file_sha256, inputs.rules.max_adapter_bytes)
    except PublishError as exc:
        ra.notes.append(f"recomputed global adapter matches its digests, but the stored copy is not available: {exc}")


def within_tolerance(rec: RoundRecord, inputs: RoundInputs, merged: MergedRound, sources: Sources) -> str | None:
    """For a rule whose result is only reproducible up to floating-point rounding (lora_exact's SVD differs
    between BLAS builds): a note when the finalized adapter has the recomputed metadata and equals the
    recomputation within the rules' declared tolerance; None otherwise (or for a bit-exact rule)."""
    strategy = merged.strategy
    if not strategy.tolerance:
        return None
    f = rec.finalized
    stored = sources.adapter(f.cid_digest, f.file_sha256, inputs.rules)
    if isinstance(stored, str) or stored[1] != unpack_adapter(merged.data, len(merged.data))[1]:
        return None
    with sources.watch("recomputation"):
        same, error = strategy.equivalent(stored[0], merged.state)
    if not same:
        return None
    return (f"global adapter equals the recomputation within the declared tolerance {strategy.tolerance:g} (max "
            f"relative error {error:.1e}; {inputs.rules.aggregation} re-factors by SVD, whose last bits differ "
            f"between BLAS builds)")
