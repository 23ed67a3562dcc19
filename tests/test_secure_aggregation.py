"""Secure aggregation, attacked for real: masks that cancel exactly, masked bytes that look uniform, keys that cannot
be substituted, shares that cannot be tampered with unnoticed, dropouts before and after the share phase, and an
audit that re-derives the unmasked aggregate bit for bit from the chain and storage alone. (The real local stack,
with one OS process per participant, runs masked rounds in tests/test_stack.py.)"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from eth_account import Account
from scipy.stats import chisquare

from chain.errors import ChainError
from chain.wallet import fund
from fednode.audit import Status, run_audit
from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.node import Node
from fednode.protocol.publish import publish_bytes, publish_json
from fednode.protocol.rules import FederationRules, RulesError
from fednode.protocol.secagg import keys as sk
from fednode.protocol.secagg.masking import SecureSettings, quantize
from fednode.protocol.secagg.shares import (SELF, SurvivorsDocument, combine, fetch_share_document, mask, open_bundle,
                                            reveal, split)
from fednode.protocol.secagg.unmask import SecureRound, UnmaskError
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore
from fednode.storage.cid import cid_from_digest
from research.secure_aggregation import dropout_round, fedavg_error, plain_updates

LORA = LoraSettings(r=4)
TRAIN = TrainSettings(steps=4, batch_size=4)
SECURE = {"threshold": 0.6, "clip": 1.0, "scale_bits": 20}
FED = "0x" + "ab" * 20 + ":1"


def wallets(n: int):
    return [Account.from_key(hashlib.sha256(f"secagg-test-{i}".encode()).digest()) for i in range(n)]


def masked_vectors(accounts, values, settings, round_id=1):
    """Each hospital's masked vector and share document, for plain uint64 `values` (already quantized)."""
    keys = {a.address: sk.public_bytes(sk.agreement_key(a, FED)) for a in accounts}
    out, docs = {}, {}
    for a, v in zip(accounts, values):
        out[a.address], docs[a.address] = mask(a, FED, round_id, keys, v, settings.shares_needed(len(keys)))
    return keys, out, docs


def unmask(accounts, keys, masked, docs, settings, survivors, revealers):
    doc = SurvivorsDocument(federation=FED, round=1, survivors={s: "cid" for s in survivors})
    reveals = [reveal(sk.agreement_key(a, FED), a.address, doc, b"\x01" * 32, docs, keys)[0] for a in revealers]
    sr = SecureRound(settings, sorted(keys, key=str.lower), survivors, docs, reveals)
    return sr, sr.unmasked_sum({s: masked[s] for s in survivors})


def test_masked_sum_equals_the_plain_quantized_sum_exactly_with_a_dropout():
    settings = SecureSettings(**SECURE)
    accounts = wallets(5)
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.zeros(300)}
    values = [quantize({"w": torch.randn(300, generator=gen) * 0.1}, start, settings, weight=10 + i)
              for i in range(5)]
    keys, masked, docs = masked_vectors(accounts, values, settings)
    survivors = [a.address for a in accounts[:4]]  # hospital 4 dealt its shares, then dropped before submitting
    _, total = unmask(accounts, keys, masked, docs, settings, survivors, accounts[1:4])  # t = 3 of 5 reveal
    assert np.array_equal(total, sum(values[:4]))
    assert not np.array_equal(sum(masked[s] for s in survivors), sum(values[:4]))  # the masks were there


def test_one_masked_update_is_indistinguishable_from_uniform():
    settings = SecureSettings(**SECURE)
    accounts = wallets(3)
    plain = quantize({"w": torch.full((20000,), 0.01)}, {"w": torch.zeros(20000)}, settings, weight=7)
    _, masked, _ = masked_vectors(accounts, [plain] * 3, settings)

    def p_value(v: np.ndarray) -> float:  # every byte position of the uint64 words, 256 bins each
        raw = v.view(np.uint8).reshape(-1, 8)
        return min(chisquare(np.bincount(raw[:, i], minlength=256)).pvalue for i in range(8))

    assert p_value(masked[accounts[0].address]) > 1e-4
    assert p_value(plain) < 1e-10  # the test can tell: the unmasked update is far from uniform


def test_shamir_shares_rebuild_with_t_and_not_with_fewer():
    secret = bytes(range(32))
    shares = split(secret, 3, 5)
    assert combine({0: shares[0], 2: shares[2], 4: shares[4]}) == secret
    assert combine({1: shares[1], 3: shares[3]}) != secret


def test_a_substituted_key_cannot_be_registered_and_a_wrong_key_does_not_open_a_bundle():
    victim, attacker = wallets(2)
    card = sk.registration(victim, FED)
    assert sk.registered_key(victim.address, card["secagg_key"], card["secagg_signature"], FED)
    # the attacker (or an aggregator) presents its own key under the victim's name, or the victim's under its own
    mine = sk.registration(attacker, FED)
    for node, key, sig in ((victim.address, mine["secagg_key"], card["secagg_signature"]),
                           (victim.address, mine["secagg_key"], mine["secagg_signature"]),
                           (attacker.address, card["secagg_key"], card["secagg_signature"])):
        with pytest.raises(sk.RegistrationError, match="signed by|malformed"):
            sk.registered_key(node, key, sig, FED)
    with pytest.raises(sk.RegistrationError, match="signed by"):  # a key signed for another federation
        sk.registered_key(victim.address, card["secagg_key"], card["secagg_signature"], FED + "0")
    # a share bundle dealt to the real key does not open under a substituted one
    settings = SecureSettings(**SECURE)
    keys, _, docs = masked_vectors(wallets(3), [np.zeros(4, np.uint64)] * 3, settings)
    dealer, holder = sorted(keys)[:2]
    with pytest.raises(ValueError, match="does not decrypt"):
        open_bundle(docs[dealer], sk.agreement_key(Account.from_key(b"\x09" * 32), FED), holder, keys[dealer])


def test_too_few_or_tampered_shares_never_give_a_wrong_sum():
    settings = SecureSettings(**SECURE)
    accounts = wallets(5)
    values = [np.arange(10, dtype=np.uint64) * i for i in range(5)]
    keys, masked, docs = masked_vectors(accounts, values, settings)
    survivors = [a.address for a in accounts]
    with pytest.raises(UnmaskError, match="valid shares .* 3 needed"):
        unmask(accounts, keys, masked, docs, settings, survivors, accounts[:2])
    doc = SurvivorsDocument(federation=FED, round=1, survivors={s: "cid" for s in survivors})
    reveals = [reveal(sk.agreement_key(a, FED), a.address, doc, b"\x01" * 32, docs, keys)[0] for a in accounts]
    forged = reveals[0].shares[survivors[2]][SELF][:-2] + "00"
    reveals[0] = reveals[0].model_copy(update={"shares": {**reveals[0].shares, survivors[2]: {SELF: forged}}})
    sr = SecureRound(settings, sorted(keys, key=str.lower), survivors, docs, reveals)
    assert np.array_equal(sr.unmasked_sum(masked), sum(values))
    assert any(accounts[0].address in p and "does not match" in p for p in sr.problems)


def test_rules_refuse_what_masked_updates_cannot_support():
    base = dict(base_model="ab", lora=LORA.to_json(), secure_aggregation=SECURE)
    for extra, match in (({}, "copy_threshold"), ({"copy_threshold": 0, "aggregation": "median"}, "not median"),
                         ({"copy_threshold": 0, "secure_aggregation": {"threshold": 0.5}}, "threshold"),
                         ({"copy_threshold": 0, "max_weight_share": 0.5}, "max_weight_share")):
        with pytest.raises(RulesError, match=match):
            FederationRules(**{**base, **extra})
    rules = FederationRules(**{**base, "copy_threshold": 0})
    assert FederationRules.from_bytes(rules.to_bytes()) == rules
    plain = FederationRules(base_model="ab", lora=LORA.to_json())
    assert b"secure_aggregation" not in plain.to_bytes()  # documents without it keep their digests


# ------------------------------------------------------------------ the embedded platform, attacked for real


@pytest.fixture(scope="module")
def clients():
    return build_clients(DataConfig(num_clients=5, train_per_client=24, eval_per_client=8))


@pytest.fixture(scope="module")
def trainer(icd_base):
    return LoraTrainer(icd_base, LORA)


def secure_federation(base, trainer, clients, tmp_path) -> tuple[EmbeddedFederation, EmbeddedStore]:
    store = EmbeddedStore(tmp_path / "store")
    rules = FederationRules(base_model=base.digest, lora=LORA.to_json(), copy_threshold=0, rounds=2,
                            secure_aggregation=SECURE)
    fed = EmbeddedFederation.create([trainer] * len(clients), clients, rules, TRAIN, store)
    fed.start(trainer.initial_state(0))
    return fed, store


def test_dropouts_before_and_after_the_share_phase_and_the_audit_re_derives_the_sum(icd_base, trainer, clients,
                                                                                 tmp_path):
    fed, store = secure_federation(icd_base, trainer, clients, tmp_path)
    with plain_updates() as plain:
        # hospital 4 trains, publishes its share document and masked update, then dies before submitting;
        # hospital 3 submits but is offline for the reveal: 3 of 5 reveal (t = 3)
        result, start, weights = dropout_round(fed, fed.nodes[:3])
    assert fed.nodes[4].address in plain and [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 4
    # the aggregate equals the plaintext FedAvg of the four survivors within the quantization error (plus the
    # float32 rounding of the result)
    error = fedavg_error(result.state, start, [plain[n.address] for n in fed.nodes[:4]], weights)
    assert 0 < error < SecureSettings(**SECURE).quantization_error + 1e-6
    # a stranger's audit re-derives the sum bit for bit from the chain and storage alone
    report = run_audit(fed.w3, fed.deployment, store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED]


def test_attacks_on_the_unmasking_are_stopped_and_named(icd_base, trainer, clients, tmp_path):
    fed, store = secure_federation(icd_base, trainer, clients[:4], tmp_path)  # t = 3 of 4
    rec = fed.open()
    for n in fed.nodes:
        n.participate(rec)
    with pytest.raises(Exception, match="waiting"):
        fed.aggregator.finalize(rec)
    rec = fed.aggregator.ledger.refresh().rounds[rec.round_id]
    attacker = fed.nodes[0]
    # the round is closed to submissions once its survivors are fixed (a raw call, past the honest client)
    with pytest.raises(ChainError, match="SubmissionsClosed"):
        attacker.fed.submit_update(rec.round_id, b"\x01" * 32, b"\x02" * 32, 1, b"\x03" * 32)
    # the attacker reveals a tampered share (its honest reveal, one share corrupted), with its own wallet, its own
    # bytes on the store and a raw contract call
    survivors = SurvivorsDocument.model_validate_json(store.get(cid_from_digest(rec.unmask.survivors_digest, "raw")))
    docs = {d: fetch_share_document(store, cid) for d, cid in survivors.survivors.items()}
    keys = attacker.round_keys(rec)
    doc, _ = reveal(sk.agreement_key(attacker.fed.sender.account, fed.federation_id), attacker.address, survivors,
                    rec.unmask.survivors_digest, docs, keys)
    victim = fed.nodes[2].address
    doc = doc.model_copy(update={"shares": {**doc.shares, victim: {SELF: "00" * 32}}})
    _, digest = publish_json(store, doc.model_dump())
    attacker.fed.reveal_shares(rec.round_id, digest)
    with pytest.raises(ChainError, match="AlreadyRevealed"):
        attacker.fed.reveal_shares(rec.round_id, digest)
    for n in fed.nodes[1:]:
        n.reveal(n.ledger.refresh().rounds[rec.round_id])
    result = fed.aggregator.finalize(rec)
    assert all(v.accepted for v in result.verdicts)
    report = run_audit(fed.w3, fed.deployment, store, verify=True)
    (ra,) = report.rounds
    assert ra.status == Status.VERIFIED
    assert any(attacker.address in note and "does not match" in note for note in ra.notes), ra.notes
    # a tampered masked update on the store is named by the audit
    sub = ra.submissions[1]
    path = store.path_of(sub.cid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    report = run_audit(fed.w3, fed.deployment, store, verify=True)
    assert report.rounds[0].status != Status.VERIFIED
    assert any("#1" in f.message for f in report.rounds[0].findings), report.rounds[0].findings


def test_a_node_without_a_registered_key_is_refused_from_a_masked_round(icd_base, trainer, clients, tmp_path):
    fed, store = secure_federation(icd_base, trainer, clients[:3], tmp_path)
    # an impostor joins with a card that copies hospital 0's key and signature
    impostor = Account.from_key(b"\x07" * 32)
    fund(fed.w3, fed.admin.sender.account, impostor.address, 10**19)
    node = Node(fed.admin.as_account(impostor), store, trainer, clients[0], fed.aggregator.rules, TRAIN)
    card = sk.registration(fed.nodes[0].fed.sender.account, fed.federation_id)
    node.join(card=card)
    fed.admin.approve(impostor.address)
    rec = fed.open()
    with pytest.raises(Exception, match="no participant with a registered key"):
        node.participate(rec)
    for n in fed.nodes:
        n.participate(rec)
    # the impostor submits anyway, by a raw call with its own bytes
    data = fed.nodes[0].train(rec).data
    _, cid_digest, sha = publish_bytes(store, data)
    _, metrics = publish_json(store, {"round": 1})
    node.fed.submit_update(rec.round_id, cid_digest, sha, 24, metrics)
    _, verdicts = fed.aggregator.verify(rec)
    assert verdicts[-1].reason == Reason.KEY_NOT_REGISTERED
    assert "signed by" in verdicts[-1].detail


def test_the_unmasking_phase_on_chain(embedded_fed):
    """Fixing the survivors closes the round to submissions; each reveal is logged for the audit (the errors of
    both calls are cases of tests/test_contracts.py)."""
    fed = embedded_fed
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    fed.submit_all(round_id, [node])
    assert not fed.admin.round(round_id).submissions_closed
    fed.aggregator.request_unmask(round_id, fed.digest("survivors"))
    assert fed.admin.round(round_id).submissions_closed
    node.reveal_shares(round_id, fed.digest("reveal"))
    assert node.reveal_commitment(round_id, node.address) == fed.digest("reveal")
    assert [e.name for e in fed.admin.events()][-2:] == ["UnmaskRequested", "SharesRevealed"]
