"""What federation buys each hospital: its federated model against the same hospital training alone on its own
data with the same step budget, on its own held-out split and on the other hospitals' (cross loss), with the
worst hospital of each named. Computed where the hospitals' data is (the demo's process), not from the chain."""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from ..learning.data import ClientData
from ..learning.settings import TrainSettings
from ..protocol.node import Node


@dataclass(frozen=True)
class HospitalLift:
    hospital: str
    federated: float        # held-out loss of the federated model on the hospital's own split
    local: float            # ... of the hospital's local-only model
    federated_cross: float  # mean loss of the federated model on the other hospitals' splits
    local_cross: float      # ... of the local-only model


@dataclass(frozen=True)
class Comparison:
    rows: list[HospitalLift]
    steps: int              # optimizer steps each hospital took, federated and alone

    @property
    def worst_federated(self) -> HospitalLift:
        return max(self.rows, key=lambda r: r.federated)

    @property
    def worst_local(self) -> HospitalLift:
        return max(self.rows, key=lambda r: r.local)

    @property
    def lift(self) -> float:
        """How much lower the worst hospital's loss is under federation than when each hospital trains alone."""
        return self.worst_local.local - self.worst_federated.federated

    def to_json(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "steps": self.steps, "lift": self.lift,
                "worst_federated": self.worst_federated.hospital, "worst_local": self.worst_local.hospital}

    def table(self) -> str:
        lines = [f"what federation bought each hospital (the same {self.steps} local steps each; held-out loss, "
                 "lower is better)",
                 f"{'client':<12} {'own: federated':>15} {'local only':>11}   {'others: federated':>18} "
                 f"{'local only':>11}"]
        for r in self.rows:
            lines.append(f"{r.hospital:<12} {r.federated:>15.4f} {r.local:>11.4f}   {r.federated_cross:>18.4f} "
                         f"{r.local_cross:>11.4f}")
        wf, wl = self.worst_federated, self.worst_local
        verb = "lowers" if self.lift > 0 else "does not lower"
        lines.append(f"worst hospital: federated {wf.federated:.4f} ({wf.hospital}) vs local only {wl.local:.4f} "
                     f"({wl.hospital}): federation {verb} the worst hospital's loss ({self.lift:+.4f} nats)")
        return "\n".join(lines)


def compare(nodes: Sequence[Node], initial: dict, final: dict, train: TrainSettings, rounds: int) -> Comparison:
    """Train each node's hospital alone from `initial` for `rounds` rounds of `train` (the seeds its federated
    rounds used), and score it and the federated `final` adapter on every hospital's held-out split (the federated
    model once per split for nodes that share a trainer and adapter config: it is the same model)."""
    federated_scores: dict[tuple, float] = {}

    def federated(node: Node, split: ClientData) -> float:
        key = (id(node.trainer), json.dumps(node.adapter_config, sort_keys=True), split.name)
        if key not in federated_scores:
            federated_scores[key] = node.trainer.evaluate(split.eval, node.start_state(final))["loss"]
        return federated_scores[key]

    rows = []
    for node in nodes:
        state = node.start_state(initial)
        for r in range(1, rounds + 1):
            state, _ = node.trainer.train(node.client.train, replace(train, seed=train.seed + r), state,
                                          progress=False)
        others = [other.client for other in nodes if other is not node]
        cross = (statistics.fmean(federated(node, c) for c in others),
                 statistics.fmean(node.trainer.evaluate(c.eval, state)["loss"] for c in others)) if others \
            else (float("nan"), float("nan"))
        rows.append(HospitalLift(node.client.name, federated(node, node.client),
                                 node.trainer.evaluate(node.client.eval, state)["loss"], *cross))
    return Comparison(rows, rounds * train.steps)
