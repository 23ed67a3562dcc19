"""Client-side DP: clipping, noise, determinism, the accountant against analytic and published values, and a round
on the embedded platform with privacy on."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, RdpAccountant
from eth_account import Account

from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.privacy import (
    DPSettings,
    PrivacyError,
    clip_and_noise,
    clip_update,
    dp_event,
    epsilon,
    privatize,
    seed_commitment,
    wallet_noise_seed,
)
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.packaging import adapter_metadata, pack_adapter
from fednode.protocol.rules import FederationRules, RulesError
from fednode.protocol.verify import Reason, update_norm
from fednode.storage import EmbeddedStore
from fednode.storage.cid import cid_from_digest

DP = DPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
SEED = hashlib.sha256(b"test seed").digest()


def _states(scale: float, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    start = {f"layer{i}.lora_{ab}.weight": torch.randn(8, 32, generator=gen) for i in range(3) for ab in "AB"}
    return start, {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in start.items()}


def _norm(delta: dict) -> float:
    return math.sqrt(sum(float(torch.sum(t.to(torch.float64) ** 2)) for t in delta.values()))


# --- clipping and noise -------------------------------------------------------------------------------------------

def test_clipping_bounds_the_delta_to_the_clip_norm_and_leaves_small_updates_alone():
    start, big = _states(scale=3.0)
    clipped, pre = clip_update(big, start, 1.0)
    assert pre == pytest.approx(update_norm(big, start), rel=1e-12) and pre > 10
    assert _norm(clipped) == pytest.approx(1.0, rel=1e-12)
    # through the whole mechanism with negligible noise: the float32 adapter the aggregator sees is C away
    tiny_noise = DPSettings(clip_norm=0.5, noise_multiplier=1e-9, delta=1e-5)
    noised, info = clip_and_noise(big, start, tiny_noise, SEED)
    assert all(t.dtype == torch.float32 for t in noised.values())
    assert update_norm(noised, start) == pytest.approx(0.5, rel=1e-4)
    assert info["clipped"] and info["pre_clip_norm"] == pre and info["noise_std"] == 0.5e-9

    _, small = _states(scale=0.01)
    unclipped, pre_small = clip_update(small, start, 1.0)
    assert pre_small < 1.0
    assert all(torch.equal(unclipped[k], small[k].double() - start[k].double()) for k in start)
    assert not clip_and_noise(small, start, DP, SEED)[1]["clipped"]


def test_noise_has_the_configured_std():
    settings = DPSettings(clip_norm=0.5, noise_multiplier=1.5, delta=1e-5)
    start = {"a": torch.zeros(600, 1000), "b": torch.zeros(400, 1000)}
    noised, info = clip_and_noise(start, start, settings, SEED)
    noise = torch.cat([noised[k].flatten() for k in sorted(noised)]).double()
    assert info["noise_std"] == 0.75 and not info["clipped"]
    n = noise.numel()
    assert float(noise.std()) == pytest.approx(0.75, rel=5 * math.sqrt(1 / (2 * n)))  # ~5 standard errors
    assert abs(float(noise.mean())) < 5 * 0.75 / math.sqrt(n)


def test_same_seed_is_bit_identical_and_round_or_node_changes_the_noise():
    start, update = _states(scale=0.5)
    first, _ = clip_and_noise(update, start, DP, SEED)
    again, _ = clip_and_noise(update, start, DP, SEED)
    assert all(torch.equal(first[k], again[k]) for k in start)

    alice, bob = (Account.from_key(hashlib.sha256(name).digest()) for name in (b"alice", b"bob"))
    seed = wallet_noise_seed(alice, "fed", 1)
    assert seed == wallet_noise_seed(alice, "fed", 1) and len(seed) == 32
    others = [wallet_noise_seed(alice, "fed", 2), wallet_noise_seed(bob, "fed", 1), wallet_noise_seed(alice, "x", 1)]
    assert len({seed, *others}) == 4
    base, _ = clip_and_noise(update, start, DP, seed)
    for other in others:
        different, _ = clip_and_noise(update, start, DP, other)
        assert not any(torch.equal(base[k], different[k]) for k in start)
    assert seed_commitment(seed) == hashlib.sha256(seed).hexdigest() != seed.hex()
    with pytest.raises(PrivacyError, match="32 bytes"):
        clip_and_noise(update, start, DP, b"short")


def test_privatize_follows_the_seed_policy_and_reports_the_accounting():
    start, update = _states(scale=0.5)
    account = Account.from_key(hashlib.sha256(b"alice").digest())
    state, metrics = privatize(update, start, DP, account, "fed", 3)
    seed = wallet_noise_seed(account, "fed", 3)
    assert metrics["noise_seed_sha256"] == seed_commitment(seed)
    assert all(torch.equal(state[k], clip_and_noise(update, start, DP, seed)[0][k]) for k in start)
    assert metrics["epsilon"] == epsilon(DP, 3) and metrics["rounds"] == 3 and metrics["noise_std"] == 1.0
    assert {k: metrics[k] for k in DP.to_json()} == DP.to_json()
    fresh = DPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, noise_seed="random")
    runs = [privatize(update, start, fresh, account, "fed", 3) for _ in range(2)]
    assert len({seed_commitment(seed), *(m["noise_seed_sha256"] for _, m in runs)}) == 3
    assert not torch.equal(runs[0][0][min(start)], runs[1][0][min(start)])


# --- settings and rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("privacy, field", [
    ({"mechanism": "laplace", "clip_norm": 1, "noise_multiplier": 1, "delta": 1e-5}, "mechanism"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 0, "delta": 1e-5}, "noise_multiplier"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": float("nan"), "delta": 1e-5}, "noise_multiplier"),
    ({"mechanism": "gaussian", "clip_norm": -1, "noise_multiplier": 1, "delta": 1e-5}, "clip_norm"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 1, "delta": 1}, "delta"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 1}, "delta"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 1, "delta": 1e-5, "sampling_rate": 0},
     "sampling_rate"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 1, "delta": 1e-5, "noise_seed": "zero"},
     "noise_seed"),
    ({"mechanism": "gaussian", "clip_norm": 1, "noise_multiplier": 1, "delta": 1e-5, "sigma": 2}, "sigma"),
    ({"mechanism": "none", "clip_norm": 1}, "none"),
    ({"clip_norm": 1}, "mechanism"),
    ("gaussian", "object"),
])
def test_bad_privacy_rules_are_refused_naming_the_field(privacy, field):
    with pytest.raises(RulesError, match=field) as exc:
        FederationRules(base_model="ab" * 32, lora=LORA.to_json(), privacy=privacy)
    assert "\n" not in str(exc.value)


def test_privacy_off_keeps_the_rules_document_and_on_parses_it():
    off = FederationRules(base_model="ab" * 32, lora=LORA.to_json())
    assert off.dp is None and FederationRules(base_model="ab" * 32, lora=LORA.to_json(), privacy={"mechanism": "none"}).dp is None
    assert b'"privacy":{}' in off.to_bytes()
    on = FederationRules(base_model="ab" * 32, lora=LORA.to_json(), privacy={**DP.to_json(), "sampling_rate": 0.5})
    assert on.dp == DPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, sampling_rate=0.5)
    assert FederationRules.from_bytes(on.to_bytes()) == on


# --- the accountant -----------------------------------------------------------------------------------------------

def _prop12(rdp: float, order: float, delta: float) -> float:
    """RDP -> (eps, delta): Canonne, Kamath & Steinke 2020, Prop. 12 (dp_accounting's conversion)."""
    return rdp + math.log1p(-1 / order) - math.log(delta * order) / (order - 1)


def _classic(settings: DPSettings, rounds: int, delta: float, orders) -> float:
    """The conversion used by Abadi et al. and TF Privacy's compute_dp_sgd_privacy, eps = min RDP - log(delta)/(a-1)
    (Mironov 2017, Prop. 3), applied to dp_accounting's RDP of our event: each single-order accountant's epsilon is
    Prop. 12 of that order's RDP, which is undone exactly."""
    best = math.inf
    for order in orders:
        acc = RdpAccountant([order])
        acc.compose(dp_event(settings, rounds))
        rdp = acc.get_epsilon(delta) - _prop12(0.0, order, delta)
        best = min(best, rdp - math.log(delta) / (order - 1))
    return best


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(multiplier: float, rounds: int, delta: float) -> float:
    """The tight epsilon of `rounds` Gaussian mechanisms with noise multiplier `multiplier` (no sampling): their
    composition is one Gaussian with mu = sqrt(rounds) / multiplier, and delta(eps) = Phi(mu/2 - eps/mu) -
    e^eps Phi(-mu/2 - eps/mu) (Balle & Wang 2018, Thm 8); solved for eps by bisection."""
    mu = math.sqrt(rounds) / multiplier
    lo, hi = 0.0, 500.0
    for _ in range(200):
        eps = (lo + hi) / 2
        if _phi(mu / 2 - eps / mu) - math.exp(eps) * _phi(-mu / 2 - eps / mu) > delta:
            lo = eps
        else:
            hi = eps
    return hi


@pytest.mark.parametrize("sigma, rounds, delta", [(2.0, 1, 1e-5), (4.0, 10, 1e-5), (10.0, 100, 1e-6)])
def test_rdp_epsilon_matches_the_analytic_gaussian_and_pld_is_near_the_exact_value(sigma, rounds, delta):
    settings = DPSettings(clip_norm=1.0, noise_multiplier=sigma, delta=delta)
    s = sigma / 2  # two clipped updates are at most 2C apart
    reference = min(_prop12(rounds * a / (2 * s * s), a, delta) for a in DEFAULT_RDP_ORDERS)
    rdp = epsilon(settings, rounds)
    assert rdp == pytest.approx(reference, rel=1e-9)
    assert rdp <= min(rounds * a / (2 * s * s) - math.log(delta) / (a - 1) for a in DEFAULT_RDP_ORDERS)
    exact = _exact_gaussian_epsilon(s, rounds, delta)
    pld = epsilon(settings, rounds, accountant="pld")
    assert exact <= pld <= exact * 1.01 + 1e-3 and pld < rdp


def test_published_epsilons_are_reproduced():
    # TF Privacy compute_dp_sgd_privacy docstring: N=60000, batch 256, noise multiplier 1.12, 60 epochs,
    # delta=1e-5 "satisfies (2.92, 1e-5)-DP" (orders 1.1..10.9 step 0.1 and 12..63, classic conversion).
    tf = DPSettings(clip_norm=1.0, noise_multiplier=2 * 1.12, delta=1e-5, sampling_rate=256 / 60000)
    steps = math.ceil(60 * 60000 / 256)
    tf_orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    assert round(_classic(tf, steps, 1e-5, tf_orders), 2) == 2.92
    # Abadi et al. 2016, Sec. 3.1: q=0.01, sigma=4, delta=1e-5, T=10000 gives eps ~ 1.26 with the moments
    # accountant (log moments at integer lambda <= 32, i.e. RDP orders 2..33).
    abadi = DPSettings(clip_norm=1.0, noise_multiplier=2 * 4.0, delta=1e-5, sampling_rate=0.01)
    assert round(_classic(abadi, 10000, 1e-5, range(2, 34)), 2) == 1.26
    # dp_accounting's sharper conversion and the PLD accountant only improve on them
    assert epsilon(abadi, 10000) < 1.26 and epsilon(tf, steps) < 2.92


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    by_rounds = [epsilon(DP, t) for t in (1, 2, 5, 20)]
    assert by_rounds == sorted(set(by_rounds))
    by_sigma = [epsilon(DPSettings(clip_norm=1.0, noise_multiplier=s, delta=1e-5), 10) for s in (0.8, 1, 2, 4, 8)]
    assert by_sigma == sorted(set(by_sigma), reverse=True)
    by_q = [epsilon(DPSettings(clip_norm=1.0, noise_multiplier=4.0, delta=1e-5, sampling_rate=q), 10)
            for q in (0.1, 0.5, 1.0)]
    assert by_q == sorted(set(by_q))
    assert epsilon(DP, 5, delta=1e-3) < epsilon(DP, 5)
    with pytest.raises(PrivacyError, match="accountant"):
        epsilon(DP, 1, accountant="moments")
    with pytest.raises(PrivacyError, match="rounds"):
        epsilon(DP, 0)
    with pytest.raises(PrivacyError, match="noise_multiplier >= 0.2.*rdp"):
        epsilon(DPSettings(clip_norm=1.0, noise_multiplier=0.01, delta=1e-5), 1, accountant="pld")


def test_the_update_norm_bound_admits_every_honest_noisy_update_and_only_dp_raises_it():
    start = {"a": torch.zeros(64, 64), "b": torch.zeros(64, 64)}  # d = 8192, the tiny model's LoRA size
    trained = {"a": torch.full((64, 64), 0.1), "b": torch.zeros(64, 64)}
    d = 2 * 64 * 64
    off = FederationRules(base_model="ab" * 32, lora=LORA.to_json())
    assert off.norm_bound(d) == off.max_update_norm == 50.0
    for sigma, raised in ((1.0, True), (0.1, False), (0.01, False)):  # sigma C sqrt(d): ~91, ~9, ~1
        dp = DPSettings(clip_norm=1.0, noise_multiplier=sigma, delta=1e-5)
        rules = replace(off, privacy=dp.to_json())
        assert (rules.norm_bound(d) > 50.0) == raised
        norms = [_norm({k: v - start[k] for k, v in clip_and_noise(trained, start, dp, bytes([i]) * 32)[0].items()})
                 for i in range(20)]
        assert max(norms) < rules.norm_bound(d)
        assert (min(norms) > 50.0) == raised  # the default bound alone would reject every honest sigma-1 update


# --- a round on the embedded platform -----------------------------------------------------------------------------

LORA = LoraSettings()
TRAIN = TrainSettings(steps=4, batch_size=4)


def test_a_private_round_is_accepted_and_each_hospital_can_prove_its_noise(tmp_path, icd_base):
    dp = DPSettings(clip_norm=0.2, noise_multiplier=0.5, delta=1e-6)
    trainer = LoraTrainer(icd_base, LORA)
    store = EmbeddedStore(tmp_path / "store")
    rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), privacy=dp.to_json())
    clients = build_clients(DataConfig(num_clients=3, train_per_client=16, eval_per_client=8))
    fed = EmbeddedFederation.create([trainer] * 3, clients, rules, TRAIN, store)
    fid, aggregator = fed.federation_id, fed.aggregator
    nodes = [(node, node.fed.sender.account) for node in fed.nodes]
    initial = trainer.initial_state(0)
    fed.start(initial)
    rec = fed.open(min_updates=3)

    submitted = [node.participate(rec) for node, _ in nodes]
    result = aggregator.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 3
    num_params = sum(t.numel() for t in initial.values())
    for (node, account), verdict in zip(nodes, result.verdicts, strict=True):
        assert verdict.submission.node == node.address
        doc = json.loads(store.get(cid_from_digest(verdict.submission.metrics_digest, "raw")))
        privacy = doc["privacy"]
        seed = wallet_noise_seed(account, fid, rec.round_id)
        assert privacy["noise_seed_sha256"] == seed_commitment(seed) and seed.hex() not in json.dumps(doc)
        assert privacy["epsilon"] == epsilon(dp, rec.round_id) and privacy["rounds"] == rec.round_id == 1
        assert (privacy["clip_norm"], privacy["noise_multiplier"], privacy["delta"]) == (0.2, 0.5, 1e-6)
        assert privacy["clipped"] == (privacy["pre_clip_norm"] > 0.2) and privacy["pre_clip_norm"] > 0
        # ||clipped + noise||^2 concentrates at ||clipped||^2 + d (sigma C)^2 (chi-square, d = num_params)
        var = privacy["noise_std"] ** 2
        signal = min(privacy["pre_clip_norm"], 0.2)
        expected = signal ** 2 + num_params * var
        slack = 6 * var * math.sqrt(2 * num_params) + 12 * signal * privacy["noise_std"]
        assert abs(verdict.update_norm ** 2 - expected) < slack
    # a hospital re-derives its update from its data and its wallet: the published bytes, bit for bit
    (node, account), sub = nodes[0], submitted[0]
    state, _ = trainer.train(node.client.train, replace(TRAIN, seed=TRAIN.seed + rec.round_id), initial,
                             progress=False)
    noised, _ = clip_and_noise(state, initial, dp, wallet_noise_seed(account, fid, rec.round_id))
    meta = adapter_metadata(fid, rec.round_id, node.address, rules.base_model, rules.lora, "update")
    assert hashlib.sha256(pack_adapter(noised, meta)).digest() == sub.file_sha256
