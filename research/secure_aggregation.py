"""Measuring secure aggregation against the plaintext it hides: the unmasked updates as each node masks them (kept in
the measuring process, never published), a round with a hospital that drops out after the share phase, and the
error of a secure aggregate against the plaintext FedAvg of the same updates."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.aggregator import RoundResult
from fednode.protocol.node import Node


@contextmanager
def plain_updates() -> Iterator[dict[str, dict]]:
    """node address -> the plain adapter it masked, for every node that masks while the context is open."""
    seen, masked = {}, Node.masked

    def spy(self, rec, rules, start, state):
        seen[self.address] = {k: v.clone() for k, v in state.items()}
        return masked(self, rec, rules, start, state)

    Node.masked = spy
    try:
        yield seen
    finally:
        Node.masked = masked


def dropout_round(fed: EmbeddedFederation, revealers: Sequence[Node]) -> tuple[RoundResult, dict, list[int]]:
    """A round in which every node but the last submits, the last one trains and publishes its shares and masked
    update and then dies before submitting, and only `revealers` reveal: (result, start adapter, weights)."""
    rec = fed.open()
    start = fed.aggregator.start_adapter(rec)[0]
    subs = [node.participate(rec) for node in fed.nodes[:-1]]
    fed.nodes[-1].train(rec)
    return fed.finalize(rec, revealers), start, [s.num_samples for s in subs]


def fedavg_error(merged: dict, start: dict, plain: Sequence[dict], weights: Sequence[int]) -> float:
    """The largest elementwise difference between `merged` and start + the sample-weighted mean of the plain deltas."""
    return max(float((merged[k].double() - start[k].double() - sum(
        w * (p[k].double() - start[k].double()) for w, p in zip(weights, plain, strict=True)) / sum(weights)
    ).abs().max()) for k in start)
