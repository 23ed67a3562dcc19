"""Dishonest hospitals, as the benchmark and the tests mount them: each attack is a node with its own wallet that
submits, through the real contract and store, an update made from its own training and from the honest updates of
the round (public in storage: an omniscient attacker). The honest nodes submit first, then the attackers.

Attacks (Blanchard et al. 2017; Baruch et al. 2019, "a little is enough"; Fang et al. 2020 for the scaling):
sign_flip and scaled (the own delta reversed / boosted to just below the norm bound), gaussian (noise at that
norm), lie (mean - z * std of the honest deltas per coordinate), free_rider (another hospital's tensors re-packed
with the attacker's own metadata), near_copy (the same plus noise of 0.1% of its norm), no_change (the start
adapter sent back), inflation (an honest update claiming 1,000,000 samples), no_metrics (a metrics document that
was never published)."""
from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fednode.numerics import distance
from fednode.protocol.ledger import RoundRecord
from fednode.protocol.node import Node, SubmittedUpdate
from fednode.protocol.packaging import adapter_metadata, pack_adapter, unpack_adapter
from fednode.protocol.publish import fetch_named, publish_bytes

BOUND_FRACTION = 0.99   # the boosted attacks sit just below the rules' norm bound
INFLATED_SAMPLES = 1_000_000

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Round:
    """What an attacker sees of the round: its start adapter, its own honest training, the honest updates already
    in storage and the rules' norm bound."""
    record: RoundRecord
    start: State
    own: State
    honest: list[State]
    bound: float


@dataclass(frozen=True)
class Attack:
    """`make` gives the state to submit (None: the attacker's own honest one), the samples to claim (None: its own
    training-set size) and whether its metrics document is published; None for an honest participant."""
    name: str
    make: Callable[[Round], tuple[State | None, int | None, bool]] | None = None


def delta(state: State, start: State) -> State:
    return {k: state[k].to(torch.float64) - start[k].to(torch.float64) for k in sorted(start)}


def apply(start: State, d: State, scale: float = 1.0) -> State:
    return {k: (start[k].to(torch.float64) + d[k] * scale).to(torch.float32) for k in sorted(start)}


def _at_bound(rnd: Round, d: State, sign: float) -> State:
    """`d` (scaled by `sign`) stretched to just below the norm bound."""
    return apply(rnd.start, d, sign * BOUND_FRACTION * rnd.bound / distance(apply(rnd.start, d), rnd.start))


def _gaussian(rnd: Round) -> State:
    seed = int.from_bytes(hashlib.sha256(f"gaussian {rnd.record.round_id}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return _at_bound(rnd, {k: torch.randn(t.shape, generator=gen, dtype=torch.float64)
                           for k, t in sorted(rnd.start.items())}, 1.0)


def lie_z(n: int, malicious: int) -> float:
    """Baruch et al.'s z_max: the largest shift that still leaves the attackers among the s = floor(n/2 + 1) - m
    honest-looking updates a majority-based rule keeps."""
    s = math.floor(n / 2 + 1) - malicious
    return statistics.NormalDist().inv_cdf((n - s) / n)


def _lie(rnd: Round, malicious: int) -> State:
    deltas = [delta(h, rnd.start) for h in rnd.honest]
    z = lie_z(len(deltas) + malicious, malicious)
    shifted = {}
    for k in sorted(rnd.start):
        stack = torch.stack([d[k] for d in deltas])
        shifted[k] = stack.mean(0) - z * stack.std(0, unbiased=False)
    return apply(rnd.start, shifted)


def _near_copy(rnd: Round) -> State:
    target = delta(rnd.honest[0], rnd.start)
    gen = torch.Generator().manual_seed(1)
    noise = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in target.items()}
    scale = 1e-3 * distance(rnd.honest[0], rnd.start) / distance(apply(rnd.start, noise), rnd.start)
    return apply(rnd.start, {k: target[k] + noise[k] * scale for k in target})


def attacks(malicious: int = 1) -> dict[str, Attack]:
    """Every attack, for `malicious` colluding attackers in the round (LIE's shift depends on it)."""
    return {a.name: a for a in (
        Attack("honest"),
        Attack("sign_flip", lambda r: (_at_bound(r, delta(r.own, r.start), -1.0), None, True)),
        Attack("scaled", lambda r: (_at_bound(r, delta(r.own, r.start), 1.0), None, True)),
        Attack("gaussian", lambda r: (_gaussian(r), None, True)),
        Attack("lie", lambda r: (_lie(r, malicious), None, True)),
        Attack("free_rider", lambda r: (r.honest[0], None, True)),
        Attack("near_copy", lambda r: (_near_copy(r), None, True)),
        Attack("no_change", lambda r: (r.start, None, True)),
        Attack("inflation", lambda r: (None, INFLATED_SAMPLES, True)),
        Attack("no_metrics", lambda r: (None, None, False)),
    )}


def attack_round(attackers: Sequence[Node], attack: Attack, rec: RoundRecord, start: State,
                 honest: Sequence[SubmittedUpdate]) -> list[SubmittedUpdate]:
    """Every attacker's submission to the round, through the contract and the store as a client that ignores the
    honest code path would: its own wallet, its own bytes, raw `submitUpdate` calls."""
    if attack.make is None:
        return [a.participate(rec) for a in attackers]
    store = attackers[0].store
    states = [unpack_adapter(fetch_named(store, u.cid_digest, u.file_sha256, 1 << 31)[1], 1 << 31)[0] for u in honest]
    out = []
    for node in attackers:
        trained = node.train(rec)
        rnd = Round(rec, start, unpack_adapter(trained.data, 1 << 31)[0], states,
                    node.rules.norm_bound(sum(t.numel() for t in start.values())))
        state, samples, with_metrics = attack.make(rnd)
        data = trained.data if state is None else pack_adapter(state, adapter_metadata(
            node.federation_id, rec.round_id, node.address, node.rules.base_model, node.adapter_config, "update"))
        samples = len(node.client.train) if samples is None else samples
        metrics = {**trained.metrics, "samples": samples}
        if with_metrics:
            out.append(node.publish_and_submit(rec.round_id, data, samples, metrics))
            continue
        cid, cid_digest, sha = publish_bytes(node.store, data)
        receipt = node.fed.submit_update(rec.round_id, cid_digest, sha, samples,
                                         hashlib.sha256(b"never published " + data).digest())
        out.append(SubmittedUpdate(rec.round_id, cid, cid_digest, sha, samples, metrics, "", receipt))
    return out
