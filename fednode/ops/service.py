"""The long-running processes: `fedchain node run` and `fedchain aggregator run`. Both keep no state of their own
beyond the chain and storage, so a restarted process picks up where the chain says the federation is. Deadlines
are judged by the next block's time, which moves on an idle chain too; an unreachable chain or IPFS node is ridden
out by the clients underneath (`chain.outage`)."""
from __future__ import annotations

import logging
import time
from typing import Callable

from chain.clients import RoundState
from chain.errors import ChainError

from ..protocol.aggregator import Aggregator, AggregatorError, AwaitingShares
from ..protocol.ledger import Ledger, RoundRecord
from ..protocol.node import Node
from ..protocol.publish import named_cid
from ..timing import Stopwatch
from .participant import Participant
from .relay_http import PATH as RELAY_PATH
from .relay_http import relay_client, serve_relay

CLOSED = ("DeadlinePassed", "RoundNotOpen")  # a submission the round no longer takes


class ServiceError(RuntimeError):
    """The federation's on-chain state forbids going on (e.g. rules for another base model)."""


def _log(message: str) -> None:
    logging.getLogger("fedchain.progress").info(message)


def clock(seconds: int) -> str:
    """A unix time as local wall-clock time."""
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def relative(seconds: int, now: float) -> str:
    """`seconds` (unix time) against `now`, as "in 4 min" or "2 min ago"."""
    delta = int(round(seconds - now))
    amount = abs(delta)
    text = f"{amount} s" if amount < 90 else f"{round(amount / 60)} min" if amount < 5400 else f"{amount / 3600:.1f} h"
    return f"in {text}" if delta >= 0 else f"{text} ago"


def run_node(p: Participant, stop: Callable[[], bool] = lambda: False, log=_log) -> dict:
    """Follow the federation: submit one update to every open round, until the rules' last round is finalized."""
    fed = p.federation
    status = fed.participant(fed.address).status.name
    log(f"node {fed.address} ({p.client.name}, {len(p.client.train)} train / {len(p.client.eval)} eval examples),"
        f" registry status {status}")
    watch = Stopwatch()
    relay = relay_client(p.config.node.relay) if p.config.node.submit == "relay" else None
    node = Node(fed, p.store, p.trainer, p.client, p.rules, p.config.train, watch,
                p.config.resolve(p.config.model.private_dir), relay=relay, log=log)
    ledger = Ledger(fed)
    evaluations, passed = {}, set()  # rounds this node takes no part in any more (said once each)
    rules_changes = 0  # RulesChanged events already said

    def skip(rec: RoundRecord, why: str) -> None:
        if rec.round_id not in passed:
            passed.add(rec.round_id)
            log(f"round {rec.round_id}: {why}; waiting for the next round")

    while not stop():
        history = ledger.refresh()
        for change in history.rules_changes[rules_changes:]:
            log(f"rules changed by admin {change.admin} at block {change.block_number}: "
                f"{change.previous_digest.hex()[:16]}… -> {change.rules_digest.hex()[:16]}…")
        rules_changes = len(history.rules_changes)
        rec = history.latest_round()
        if rec is None:
            time.sleep(p.config.federation.poll_seconds)
            continue
        rules = _check_rules(p, node, rec)
        if rec.unmask is not None and rec.state == RoundState.OPEN:
            try:
                receipt = node.reveal(rec)
            except ChainError as exc:  # finalized with enough shares from the others meanwhile
                if exc.error_name not in CLOSED:
                    raise
                receipt = None
            if receipt is not None:
                log(f"round {rec.round_id}: revealed the shares that remove the survivors' masks (tx "
                    f"{receipt.tx_hash})")
        if rec.state == RoundState.OPEN and rec.round_id not in passed:
            if node.has_submitted(rec.round_id):
                skip(rec, "this node's update is already on-chain (submitted before a restart)")
            elif fed.next_block_time() > rec.deadline:
                skip(rec, f"closed at its deadline {clock(rec.deadline)} before this node could submit")
            else:
                log(f"round {rec.round_id}: training on {len(p.client.train)} examples (deadline "
                    f"{clock(rec.deadline)})")
                try:
                    sub = node.participate(rec)
                except ChainError as exc:
                    if exc.error_name not in CLOSED:
                        raise
                    skip(rec, f"closed while this node trained, its update is not submitted ({exc})")
                    continue
                if sub is not None and sub.receipt is None:
                    passed.add(rec.round_id)
                    log(f"round {rec.round_id}: signed {sub.cid} (train loss {sub.metrics['train_loss']:.4f}) and "
                        f"handed it to the relay {p.config.node.relay} as {sub.signed_cid}; no transaction")
                elif sub is not None:
                    passed.add(rec.round_id)
                    log(f"round {rec.round_id}: submitted {sub.cid} (train loss {sub.metrics['train_loss']:.4f}, "
                        f"tx {sub.receipt.tx_hash}, gas {sub.receipt.gas_used:,})")
                    log(f"round {rec.round_id}: waiting for the other hospitals and the aggregator (deadline "
                        f"{clock(rec.deadline)}, {relative(rec.deadline, fed.next_block_time())})")
                continue
        if rec.state == RoundState.FINALIZED and rec.round_id >= rules.rounds:
            log(f"round {rec.round_id} finalized, the last: evaluating the final global adapter on "
                f"{len(p.client.eval)} held-out examples")
            state = node.global_state_from(*rec.next_base)
            evaluations = node.evaluate(rec.finalized.cid_digest, state)
            log(f"federation complete after round {rec.round_id}: final global adapter eval loss "
                f"{evaluations['loss']:.4f} on {p.client.name}'s held-out split")
            log(f"final global adapter: {named_cid(*rec.next_base)} (round {rec.round_id}); as a model: fedchain "
                f"adapter export --config {p.config.path} --round {rec.round_id} --out adapter")
            break
        time.sleep(p.config.federation.poll_seconds)
    log(f"time: {watch.as_dict()}")
    return {"final_eval": evaluations, "seconds": watch.as_dict()}


def _check_rules(p: Participant, node: Node, rec: RoundRecord):
    rules = node.round_rules(rec)
    if rules.base_model != p.rules.base_model or (rules.adapter, rules.lora) != (p.rules.adapter, p.rules.lora):
        raise ServiceError(f"round {rec.round_id} uses base model {rules.base_model[:16]}… / {rules.adapter} adapter "
                           f"{rules.lora}; this node has {p.rules.base_model[:16]}… / {p.rules.adapter} adapter "
                           f"{p.rules.lora}")
    if rules.objective != p.rules.objective:
        raise ServiceError(f"round {rec.round_id} asks local training for {rules.client or 'the plain loss'}; this "
                           f"node is configured for {p.rules.client or 'the plain loss'} ([federation] client)")
    return rules


def run_aggregator(p: Participant, stop: Callable[[], bool] = lambda: False, log=_log) -> list[int]:
    """Open rounds, wait for updates, verify, merge, finalize, and open the next round, until the configured
    number of rounds is finalized. A round that cannot be finalized (no valid update, quorum not reached) waits for
    its deadline and is then finalized below quorum if its rules allow it, else cancelled. Returns the finalized
    round ids."""
    f = p.config.federation
    watch = Stopwatch()
    agg = Aggregator(p.federation, p.store, p.rules, watch, log=log)
    agg.check_quorum(f.min_updates)  # before anything is published or sent
    listen = p.config.aggregator.relay_listen
    server = serve_relay(listen, agg.relayer.receive) if listen else None
    if server is not None:
        log(f"relay: taking signed updates on http://{listen}{RELAY_PATH}")
    try:
        return _aggregate(p, agg, watch, stop, log)
    finally:
        if server is not None:
            server.shutdown()


def _aggregate(p: Participant, agg: Aggregator, watch: Stopwatch, stop: Callable[[], bool], log) -> list[int]:
    """The aggregator's loop, while its relay endpoint (if any) serves."""
    f = p.config.federation
    finalized, waiting, unmasking = [], set(), set()  # rounds waiting for their deadline, for shares (said once)

    def opened(rec: RoundRecord, start: str) -> None:
        log(f"round {rec.round_id} opened from {start} (deadline {clock(rec.deadline)}, in "
            f"{rec.deadline - p.federation.next_block_time()} s)")

    while not stop():
        rec = agg.ledger.refresh().latest_round()
        if rec is None:
            cid, cid_digest, sha = agg.publish_global(0, p.global_trainer.initial_state(f.seed))
            opened(agg.open_round(cid_digest, sha, f.round_seconds, f.min_updates, f.allow_below_quorum),
                   f"the initial adapter {cid}")
        elif rec.state == RoundState.OPEN:
            if not agg.ready(rec) or (rec.round_id in waiting and not agg.deadline_passed(rec)):
                time.sleep(f.poll_seconds)
                continue
            try:
                result = agg.finalize(rec)
            except AwaitingShares as exc:
                rec = agg.ledger.refresh().rounds[rec.round_id]
                if agg.fed.next_block_time() <= agg.fed.w3.eth.get_block(rec.unmask.block_number)["timestamp"] \
                        + f.round_seconds:
                    if rec.round_id not in unmasking:
                        unmasking.add(rec.round_id)
                        log(str(exc))
                    time.sleep(f.poll_seconds)
                    continue
                log(f"{exc}, {f.round_seconds} s after the survivors were fixed: cancelling")
                p.federation.cancel_round(rec.round_id)
                continue
            except AggregatorError as exc:
                if not agg.deadline_passed(rec):
                    if rec.round_id not in waiting:
                        waiting.add(rec.round_id)
                        log(f"{exc}; waiting for its deadline {clock(rec.deadline)}")
                    continue
                log(f"{exc}: cancelling")
                p.federation.cancel_round(rec.round_id)
                continue
            finalized.append(rec.round_id)
            log(f"round {rec.round_id}: global {result.cid}, tx {result.receipt.tx_hash}, "
                f"gas {result.receipt.gas_used:,}")
        elif rec.state == RoundState.FINALIZED and rec.round_id >= p.rules.rounds:
            log(f"federation complete: {rec.round_id} rounds finalized")
            break
        else:
            opened(agg.open_round(*rec.next_base, f.round_seconds, f.min_updates, f.allow_below_quorum),
                   f"round {rec.round_id}'s {'global' if rec.finalized else 'start'} adapter")
    log(f"time: {watch.as_dict()}")
    return finalized
