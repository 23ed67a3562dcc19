"""Deadlines on a real anvil that mines only when a transaction arrives (its clock stands still while idle): a round
missing a hospital closes right after its deadline, below quorum when its rules allow it and cancelled otherwise;
a chain idle for longer than a round still opens the next one; a node's transactions survive the chain node
restarting. Every participant runs in this process (the multi-process outage run is in test_stack.py)."""
from __future__ import annotations

import threading
import time

import pytest

from chain.connection import connect
from chain.errors import ChainError
from devstack import anvil as anvil_process
from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.aggregator import AggregatorError
from fednode.protocol.rules import FederationRules
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore
from support import free_port

LORA = LoraSettings(r=2)
TRAIN = TrainSettings(steps=2, batch_size=4)
ROUND_SECONDS = 4
pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def clients():
    return build_clients(DataConfig(num_clients=3, train_per_client=16, eval_per_client=8))


@pytest.fixture
def federation(anvil, icd_base, clients, tmp_path):
    trainer = LoraTrainer(icd_base, LORA)
    rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json())
    fed = EmbeddedFederation.create([trainer] * 3, clients, rules, TRAIN, EmbeddedStore(tmp_path / "store"),
                                    w3=connect(anvil.url))
    fed.start(trainer.initial_state(0))
    return fed


def wait_until_ready(fed, rec, limit: float = 30.0) -> float:
    """Poll the aggregator as its service does; the wall time at which it saw the round ready."""
    started = time.monotonic()
    while not fed.aggregator.ready(rec):
        assert time.monotonic() - started < limit, "the aggregator never saw the deadline pass"
        time.sleep(0.2)
    return time.time()


def test_an_absent_hospital_closes_the_round_below_quorum_right_after_its_deadline(federation):
    fed = federation
    rec = fed.aggregator.open_round(*fed.base, ROUND_SECONDS, min_updates=3, allow_below_quorum=True)
    for node in fed.nodes[:2]:  # the third hospital never shows up
        node.participate(rec)
    seen = wait_until_ready(fed, rec)
    assert fed.admin.chain_time() <= rec.deadline  # nothing was mined since: the latest block's clock stood still
    assert rec.deadline < seen < rec.deadline + 2
    result = fed.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 2
    assert fed.aggregator.fed.round(rec.round_id).accepted == 2
    nxt = fed.open(min_updates=3, round_seconds=ROUND_SECONDS)  # and the next round opens from its result
    assert (nxt.round_id, nxt.base_cid_digest) == (rec.round_id + 1, result.cid_digest)


def test_without_leave_to_close_below_quorum_the_round_is_cancelled_and_the_next_opens(federation):
    fed = federation
    rec = fed.aggregator.open_round(*fed.base, ROUND_SECONDS, min_updates=3, allow_below_quorum=False)
    for node in fed.nodes[:2]:
        node.participate(rec)
    with pytest.raises(AggregatorError, match="2 accepted updates, fewer than its quorum 3; cancel it after"):
        fed.finalize(rec)  # refused before any transaction: the contract would revert
    wait_until_ready(fed, rec)
    with pytest.raises(AggregatorError, match="fewer than its quorum 3; cancel it after its deadline"):
        fed.finalize(rec)
    fed.aggregator.fed.cancel_round(rec.round_id)
    nxt = fed.open(min_updates=2, round_seconds=ROUND_SECONDS)
    assert nxt.round_id == rec.round_id + 1 and nxt.base_cid_digest == rec.base_cid_digest
    for node in fed.nodes:
        node.participate(nxt)
    assert len(fed.finalize(nxt).accepted) == 3


def test_a_chain_idle_for_longer_than_a_round_still_opens_one_with_its_full_time(federation):
    fed = federation
    fed.aggregator.check_lineage(*fed.base)  # the initial adapter and rules registered, as round 1 does
    idle_since = fed.admin.chain_time()
    time.sleep(ROUND_SECONDS + 2)
    # the deadline the latest block's clock gives is already past: that transaction would revert
    with pytest.raises(ChainError, match="InvalidDeadline"):
        fed.aggregator.fed.open_round(*fed.base, fed.aggregator.rules.digest(), idle_since + ROUND_SECONDS, 3)
    rec = fed.open(min_updates=3, round_seconds=ROUND_SECONDS)
    assert abs(rec.deadline - (time.time() + ROUND_SECONDS)) <= 2  # the hospitals get the whole round
    for node in fed.nodes:
        node.participate(rec)
    assert len(fed.finalize(rec).accepted) == 3


def test_a_submission_survives_the_chain_node_restarting(tmp_path, icd_base, clients):
    """anvil goes away between a node's training and its submission and comes back 3 s later: the node's client
    rides it out and the update lands exactly once."""
    state_dir, port = tmp_path / "anvil", free_port()
    handle = anvil_process.start(state_dir, port=port)
    try:
        trainer = LoraTrainer(icd_base, LORA)
        rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json())
        fed = EmbeddedFederation.create([trainer] * 3, clients, rules, TRAIN, EmbeddedStore(tmp_path / "store"),
                                        w3=connect(handle.url, outage_seconds=60))
        fed.start(trainer.initial_state(0))
        rec = fed.open(min_updates=3)
        node = fed.nodes[0]
        update = node.train(rec)
        anvil_process.stop(state_dir)
        started = time.monotonic()
        threading.Timer(3.0, lambda: anvil_process.start(state_dir, port=port)).start()
        sub = node.publish_and_submit(rec.round_id, update.data, update.num_samples, update.metrics)
        assert time.monotonic() - started >= 3.0
        assert node.has_submitted(rec.round_id)
        submissions = fed.aggregator.ledger.refresh().rounds[rec.round_id].submissions
        assert [(s.node, s.tx_hash) for s in submissions] == [(node.address, sub.receipt.tx_hash)]
    finally:
        anvil_process.stop(state_dir)
