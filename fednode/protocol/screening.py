"""The checks that compare a round's updates with each other (rules version 2), after each passed its own checks:
an update that changed (almost) nothing from the start adapter, or that is (almost) a copy of an earlier one, is a
free-rider's, and is rejected; the earliest of a set of copies keeps its place. "Almost" is the rules'
`copy_threshold`, relative to the updates' own sizes. Distances are machine-independent sums
(`fednode.numerics`), so an auditor on another machine reaches the same verdicts."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

from ..numerics import distance
from .rules import FederationRules
from .verify import Reason, Verdict


def screen(verdicts: Sequence[Verdict], start: dict, rules: FederationRules) -> list[Verdict]:
    """`verdicts` (in submission order) with free riders rejected: NO_CHANGE when an update's distance from the
    start adapter is at most copy_threshold times the median over the round's accepted updates (so exactly zero
    always is), COPIED when its distance to an earlier accepted update is at most copy_threshold times the larger
    of the two updates' norms."""
    tau = rules.copy_threshold
    if rules.version < 2 or not tau:
        return list(verdicts)
    accepted = [v for v in verdicts if v.accepted]
    if not accepted:
        return list(verdicts)
    median = statistics.median(v.update_norm for v in accepted)
    out, kept = [], []
    for v in verdicts:
        if v.accepted:
            if v.update_norm <= tau * median:
                v = replace(v, reason=Reason.NO_CHANGE, state=None,
                            detail=f"update norm {v.update_norm:.3g} is at most {tau:g} x the round's median "
                                   f"{median:.3g}: (almost) the start adapter itself")
            else:
                original = next((k for k in kept if _close(v, k, tau)), None)
                if original is not None:
                    gap = distance(v.state, original.state)
                    v = replace(v, reason=Reason.COPIED, state=None,
                                detail=f"within {gap:.3g} of update #{original.submission.index} (at most {tau:g} x "
                                       f"the larger update norm): a copy")
                else:
                    kept.append(v)
        out.append(v)
    return out


def _close(v: Verdict, earlier: Verdict, tau: float) -> bool:
    if v.adapter_config != earlier.adapter_config:  # other ranks (lora_exact): other tensors, never a copy
        return False
    bound = tau * max(v.update_norm, earlier.update_norm)
    if abs(v.update_norm - earlier.update_norm) > bound:  # the triangle inequality rules it out cheaply
        return False
    return distance(v.state, earlier.state) <= bound and not math.isnan(bound)
