"""Dishonest hospitals mounted for real on the embedded platform (and, for the free-rider, the inflated count and a
lying digest, on anvil + a real IPFS node): each attacker has its own wallet, puts its own bytes in storage and
calls the contract itself. Copies, free riders, inflated sample counts and broken metrics documents are rejected
with their own reason codes; poisoned updates are outvoted by the robust rules; the audit reproduces every verdict."""
from __future__ import annotations

import hashlib
import statistics
import time

import pytest
import torch
from support import metrics_for

from chain.clients import Federation
from chain.connection import connect
from chain.wallet import dev_account, fund
from fednode.audit import Status, run_audit
from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.numerics import distance
from fednode.ops.embedded import EmbeddedFederation, node_account
from fednode.protocol.aggregator import AggregatorError
from fednode.protocol.node import Node
from fednode.protocol.publish import publish_bytes, publish_json
from fednode.protocol.rules import FederationRules, RulesError
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore, IpfsHttpStore
from research.attacks import INFLATED_SAMPLES, attack_round, attacks

LORA = LoraSettings(r=4)
TRAIN = TrainSettings(steps=4, batch_size=4)
HOSPITALS = 5


@pytest.fixture(scope="module")
def clients():
    return build_clients(DataConfig(num_clients=HOSPITALS, train_per_client=24, eval_per_client=8))


@pytest.fixture(scope="module")
def trainer(icd_base):
    return LoraTrainer(icd_base, LORA)


def federation(base, trainer, clients, store, w3=None, **rules) -> EmbeddedFederation:
    fed = EmbeddedFederation.create([trainer] * len(clients), clients,
                                    FederationRules(base_model=base.digest, lora=LORA.to_json(), **rules), TRAIN,
                                    store, w3=w3)
    fed.start(trainer.initial_state(0))
    return fed


def attacked_round(fed, attack: str, malicious: int = 1, min_updates: int = 1):
    """Honest hospitals first, then `malicious` attackers mounting `attack`; the result and the honest updates."""
    honest_nodes, attackers = fed.nodes[:-malicious], fed.nodes[-malicious:]
    rec = fed.open(min_updates)
    honest = [n.participate(rec) for n in honest_nodes]
    attack_round(attackers, attacks(malicious)[attack], rec, fed.aggregator.start_adapter(rec)[0], honest)
    return fed.finalize(rec), honest


def audited(fed) -> None:
    report = run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED] * len(report.rounds), report.table()


def test_free_riders_and_copies_are_rejected_and_the_earliest_keeps_its_place(icd_base, trainer, clients, tmp_path):
    fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / "store"))
    rec = fed.open()
    honest = [n.participate(rec) for n in fed.nodes[:2]]
    start = fed.aggregator.start_adapter(rec)[0]
    for attacker, name in zip(fed.nodes[2:], ("free_rider", "near_copy", "no_change")):
        attack_round([attacker], attacks()[name], rec, start, honest)
    result = fed.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED, Reason.ACCEPTED, Reason.COPIED, Reason.COPIED,
                                                   Reason.NO_CHANGE]
    assert "of update #0" in result.verdicts[2].detail and "of update #0" in result.verdicts[3].detail
    audited(fed)


def joined(fed, client, trainer, index: int, card: dict | None = None) -> Node:
    """One more hospital with its own funded wallet, joined (with `card` in its model card) and approved."""
    account = node_account(1000 + index)
    fund(fed.w3, dev_account(fed.w3, 0), account.address, 10**20)
    node = Node(Federation(fed.w3, fed.deployment, account), fed.aggregator.store, trainer, client,
                fed.aggregator.rules, TRAIN)
    node.join(card)
    fed.admin.approve(node.address)
    return node


def test_an_inflated_sample_count_is_rejected_and_an_inflated_declaration_is_capped(icd_base, trainer, clients,
                                                                                      tmp_path):
    fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / "claims"))
    result, _ = attacked_round(fed, "inflation")
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 4 + [Reason.SAMPLES_OVER_DECLARED]
    assert f"claims {INFLATED_SAMPLES} samples" in result.verdicts[-1].detail
    audited(fed)
    # a wallet declares a huge training set when it joins and a careless admin approves it: its claims then pass,
    # but max_weight_share bounds the weight they buy
    capped = federation(icd_base, trainer, clients[:3], EmbeddedStore(tmp_path / "cap"), max_weight_share=0.4)
    liar = joined(capped, clients[3], trainer, 0, {"dataset_size": INFLATED_SAMPLES})
    rec = capped.open()
    updates = [n.participate(rec) for n in capped.nodes]
    start = capped.aggregator.start_adapter(rec)[0]
    attack_round([liar], attacks()["inflation"], rec, start, updates)
    result = capped.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 4
    by_hand = {k: sum(w * v.state[k].double() for w, v in zip((0.2, 0.2, 0.2, 0.4), result.verdicts))
               for k in start}  # three honest hospitals of 24 samples share 0.6 equally; the liar gets 0.4
    assert all(torch.allclose(result.state[k].double(), t, rtol=1e-6, atol=1e-9) for k, t in by_hand.items())
    audited(capped)


def test_a_missing_or_malformed_metrics_document_rejects_the_update(icd_base, trainer, clients, tmp_path):
    fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / "store"))
    rec = fed.open()
    honest = [n.participate(rec) for n in fed.nodes[:3]]
    attack_round(fed.nodes[3:4], attacks()["no_metrics"], rec, fed.aggregator.start_adapter(rec)[0], honest)
    liar = fed.nodes[4]  # a metrics document that contradicts the submission (another sample count)
    update = liar.train(rec)
    _, cid_digest, sha = publish_bytes(liar.store, update.data)
    _, metrics = publish_json(liar.store, {**metrics_for(liar, rec.round_id, update.num_samples), "samples": 3})
    liar.fed.submit_update(rec.round_id, cid_digest, sha, update.num_samples, metrics)
    result = fed.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 3 + [Reason.METRICS_UNAVAILABLE,
                                                                           Reason.BAD_METRICS]
    assert "samples is 3" in result.verdicts[-1].detail
    audited(fed)


@pytest.mark.parametrize("attack", ["sign_flip", "scaled", "gaussian", "lie"])
def test_one_poisoned_update_in_five_is_outvoted_by_the_robust_rules(icd_base, trainer, clients, tmp_path, attack):
    """The same round (same honest updates, same attacker) merged by each rule; the global adapter's distance from
    the honest updates' own mean, in units of their spread around it."""
    spread = {}
    for rule, params in RULES.items():
        fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / rule), **params)
        result, honest = attacked_round(fed, attack, min_updates=5)
        assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 5  # verification alone cannot tell
        states = [v.state for v in result.verdicts[:4]]
        mean = {k: sum(s[k].double() for s in states) / 4 for k in states[0]}
        spread[rule] = distance(result.state, mean) / statistics.fmean(distance(s, mean) for s in states)
        audited(fed)
    if attack == "lie":  # a little is enough: it stays within the honest spread, so every rule merges it quietly
        assert all(ratio < 3 for ratio in spread.values()), spread
    else:
        assert spread["fedavg"] > 10, spread
        assert all(ratio < 3 for rule, ratio in spread.items() if rule != "fedavg"), spread


def test_a_sybil_pair_of_sign_flipped_updates_is_outvoted_by_the_median(icd_base, trainer, clients, tmp_path):
    spread = {}
    for rule in ("fedavg", "median"):
        fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / rule), **RULES[rule])
        result, _ = attacked_round(fed, "sign_flip", malicious=2)
        states = [v.state for v in result.verdicts[:3]]
        mean = {k: sum(s[k].double() for s in states) / 3 for k in states[0]}
        spread[rule] = distance(result.state, mean) / statistics.fmean(distance(s, mean) for s in states)
        audited(fed)
    assert spread["fedavg"] > 10 and spread["median"] < 3, spread


RULES = {"fedavg": {}, "median": {"aggregation": "median"},
         "trimmed_mean": {"aggregation": "trimmed_mean", "params": {"beta": 0.2}},
         "krum": {"aggregation": "krum", "params": {"f": 1}},
         "multi_krum": {"aggregation": "multi_krum", "params": {"f": 1, "m": 3}},
         "clipped_fedavg": {"server_clip": 1.0}}


def test_a_rule_that_needs_more_hospitals_is_refused_before_a_round_opens(icd_base, trainer, clients, tmp_path):
    fed = federation(icd_base, trainer, clients, EmbeddedStore(tmp_path / "store"), aggregation="krum",
                     params={"f": 2})
    with pytest.raises(AggregatorError) as info:
        fed.open(min_updates=5)  # Krum with f = 2 needs n >= 2f + 3 = 7
    assert str(info.value) == ("krum merges at least 7 updates a round, but the quorum (min_updates) is 5: raise "
                               "min_updates to 7 or more")
    assert fed.aggregator.ledger.refresh().latest_round() is None  # nothing was sent
    for params, needle in (({"f": 0}, "whole number >= 1"), ({"f": 1.5}, "whole number >= 1"),
                           ({"f": 1, "m": 0}, "whole number >= 1")):
        with pytest.raises(RulesError, match=needle):
            FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), aggregation="multi_krum", params=params)
    with pytest.raises(RulesError, match="beta must be below 0.5"):
        FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), aggregation="trimmed_mean",
                        params={"beta": 0.5})


# ---------------------------------------------------------------- on anvil and a real IPFS node


@pytest.mark.stack
def test_free_riding_an_inflated_count_and_a_lying_digest_on_the_real_stack(local_stack, icd_base, trainer,
                                                                           clients):
    anvil, ipfs = local_stack
    store = IpfsHttpStore(ipfs.api_url, timeout_s=10)
    fed = federation(icd_base, trainer, clients, store, w3=connect(anvil.url))
    rec = fed.open()
    honest = [n.participate(rec) for n in fed.nodes[:2]]
    start = fed.aggregator.start_adapter(rec)[0]
    attack_round(fed.nodes[2:3], attacks()["free_rider"], rec, start, honest)
    attack_round(fed.nodes[3:4], attacks()["inflation"], rec, start, honest)
    liar = fed.nodes[4]  # the right bytes on IPFS, a sha256 on-chain that is not theirs
    update = liar.train(rec)
    _, cid_digest, _ = publish_bytes(store, update.data)
    _, metrics = publish_json(store, update.metrics)
    liar.fed.submit_update(rec.round_id, cid_digest, hashlib.sha256(b"other bytes").digest(), update.num_samples,
                           metrics)
    result = fed.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED, Reason.ACCEPTED, Reason.COPIED,
                                                   Reason.SAMPLES_OVER_DECLARED, Reason.SHA256_MISMATCH]
    audited(fed)


@pytest.mark.stack
def test_missing_metrics_documents_cost_one_timeout_not_one_each(local_stack, icd_base, trainer, clients):
    """Three updates name metrics documents that were never published: js-ipfs waits the whole timeout for each
    missing CID, yet the aggregator and the audit spend about one timeout on all three (fetched in parallel, the
    answer kept for every later reference)."""
    anvil, ipfs = local_stack
    timeout = 3.0
    store = IpfsHttpStore(ipfs.api_url, timeout_s=timeout)
    fed = federation(icd_base, trainer, clients, store, w3=connect(anvil.url))
    rec = fed.open()
    honest = [n.participate(rec) for n in fed.nodes[:2]]
    attack_round(fed.nodes[2:], attacks(3)["no_metrics"], rec, fed.aggregator.start_adapter(rec)[0], honest)
    started = time.monotonic()
    result = fed.finalize(rec)
    aggregation = time.monotonic() - started
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 2 + [Reason.METRICS_UNAVAILABLE] * 3
    started = time.monotonic()
    audited(fed)
    audit = time.monotonic() - started
    assert aggregation < 2.5 * timeout and audit < 2.5 * timeout, (aggregation, audit)
