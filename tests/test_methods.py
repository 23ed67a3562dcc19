"""Every federated method (fednode/methods.py) through the whole platform: nodes train with the method's client
objective and adapter, the aggregator verifies and merges with its rule, the audit re-checks every round from the
chain and store alone. On the embedded chain + store and on the local stack (real anvil + a real IPFS node)."""
from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch
from support import metrics_for

from chain.connection import connect
from fednode.audit import Status, run_audit
from fednode.learning.adapters import make_trainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, PromptSettings, TrainSettings
from fednode.ops.config import ConfigError, load_config
from fednode.ops.embedded import EmbeddedFederation, method_trainers
from fednode.protocol.encoding import INDICES, SCALES
from fednode.protocol.methods import METHODS, MethodError, method
from fednode.protocol.node import Node
from fednode.protocol.packaging import adapter_metadata, pack_adapter, unpack_adapter
from fednode.protocol.private_adapters import PrivateAdapters
from fednode.protocol.rules import FederationRules, RulesError
from fednode.protocol.verify import Reason, update_norm
from fednode.storage import EmbeddedStore, IpfsHttpStore
from fednode.strategies.base import WeightedUpdate
from fednode.strategies.fedavg import FedAvg

LORA = LoraSettings()
PROMPT = PromptSettings(num_virtual_tokens=4)
TRAIN = TrainSettings(steps=3, batch_size=4)
ROUNDS = 2


@pytest.fixture(scope="module")
def clients():
    return build_clients(DataConfig(num_clients=3, train_per_client=16, eval_per_client=8))


class Run:
    """One method's federation in this process, on `w3` and `store`."""

    def __init__(self, name: str, base, clients, store, w3=None, private_dir=None):
        self.method = method(name)
        self.global_trainer, trainers = method_trainers(base, self.method, LORA, PROMPT, len(clients))
        train = self.method.train_settings(TRAIN)
        self.rules = self.method.rules(base.digest, LORA, PROMPT, train, rounds=ROUNDS, max_adapter_bytes=1 << 20)
        self.store = store
        self.fed = EmbeddedFederation.create(trainers, clients, self.rules, train, store, w3=w3)
        if private_dir is not None:
            for node in self.fed.nodes:
                node.private = PrivateAdapters(private_dir, self.fed.federation_id, node.address)
        self.initial = self.global_trainer.initial_state(0)
        self.fed.start(self.initial)
        self.results, self.updates = [], []

    def round(self, nodes=None):
        run = self.fed.run_round(nodes, min_updates=self.method.min_clients)
        self.updates.append(run.updates)
        self.results.append(run.result)
        return run.record, run.result

    def stored(self, update) -> tuple[dict, dict]:
        return unpack_adapter(self.store.get(update.cid), 1 << 20)


def run_and_audit(name, base, clients, store, w3=None) -> Run:
    needed = method(name).min_clients  # Krum needs 2f + 3 hospitals
    if len(clients) < needed:
        clients = build_clients(DataConfig(num_clients=needed, train_per_client=16, eval_per_client=8))
    run = Run(name, base, clients, store, w3)
    for _ in range(ROUNDS):
        _, result = run.round()
        assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * len(clients), result.verdicts
    report = run_audit(run.fed.w3, run.fed.deployment, store, verify=True)
    assert report.ok and [r.status for r in report.rounds] == [Status.VERIFIED] * ROUNDS, report.summary()
    assert not [n for r in report.rounds for n in r.notes if "claim epsilon" in n]  # every epsilon reproduced
    return run


def check_method(run: Run) -> None:
    """What each method must show in its published updates and global adapters."""
    m, first, last = run.method, run.updates[0], run.results[-1]
    states = [run.stored(u)[0] for u in first]
    if m.adapter == "prompt":
        assert set(last.state) == {"prompt_embeddings"}
        assert last.state["prompt_embeddings"].shape == (PROMPT.num_virtual_tokens, 64)
    elif m.adapter == "full":  # every weight of the base travels, and every one was trained
        base = dict(run.global_trainer.base.model.named_parameters())
        assert set(last.state) == set(base) and all(not torch.equal(last.state[k], run.initial[k]) for k in base)
    else:
        assert set(last.state) == set(run.initial) and all("local" not in k for s in states for k in s)
    if m.client.get("freeze_a"):  # FFA: A never moves; FedAvg of B is then the exact mean of the products
        assert all(torch.equal(last.state[k], run.initial[k]) for k in run.initial if ".lora_A." in k)
        assert any(not torch.equal(last.state[k], run.initial[k]) for k in run.initial if ".lora_B." in k)
    if m.client_ranks:
        ranks = [s[next(k for k in s if ".lora_A." in k)].shape[0] for s in states]
        assert ranks == [8, 4, 2] and next(v for k, v in last.state.items() if ".lora_A." in k).shape[0] == LORA.r
    if m.client.get("local_rank"):
        for node, update in zip(run.fed.nodes, run.updates[-1]):
            assert node.private.rounds() == list(range(1, ROUNDS + 1))
            assert update.metrics["orthogonality"] >= 0 and "personal_eval_loss" in update.metrics
    if m.encoding:  # published as encoded deltas: the declared dtype, fewer bytes than float32
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}[m.encoding["dtype"]]
        assert all(t.dtype == dtype for s in states for k, t in s.items() if k not in (SCALES, INDICES))
        assert all(u.size < 0.7 * len(pack_adapter(run.initial, {})) for u in first)
    if m.secure_aggregation:  # masked: integers modulo 2^64, nothing of the update readable
        assert all(t.dtype == torch.int64 for s in states for t in s.values())
    if m.privacy:
        eps = [u.metrics["privacy"]["epsilon"] for u in run.updates[-1]]
        assert all(e > 0 for e in eps) and len(set(eps)) == 1
    if m.privacy.get("target_epsilon"):  # calibrated for the rules' rounds: the budget is spent, to within 1%
        assert eps[0] == pytest.approx(m.privacy["target_epsilon"], rel=0.01) and eps[0] <= m.privacy["target_epsilon"]
        assert all(v.update_norm > 0 for v in last.verdicts)
    if m.aggregation == "krum":  # one of the updates becomes the global adapter, exactly
        assert any(all(torch.equal(last.state[k], run.stored(u)[0][k]) for k in last.state) for u in run.updates[-1])
    if m.aggregation in ("median", "trimmed_mean"):  # every coordinate within the updates' range
        stacked = {k: torch.stack([run.stored(u)[0][k] for u in run.updates[-1]]) for k in last.state}
        assert all(bool(((stacked[k].min(0).values <= t) & (t <= stacked[k].max(0).values)).all())
                   for k, t in last.state.items())
    if m.server_clip:  # FedAvg of the deltas clipped to the round's median norm, and not of the raw ones
        start = run.results[-2].state
        stored = [(u, run.stored(u)[0]) for u in run.updates[-1]]
        bound = m.server_clip * statistics.median(update_norm(state, start) for _, state in stored)
        raw, clipped = [], []
        for u, state in stored:
            scale = min(1.0, bound / update_norm(state, start))
            raw.append(WeightedUpdate(len(raw), u.num_samples, state, file_sha256=u.file_sha256))
            clipped.append(replace(raw[-1], state={k: start[k] + (t - start[k]) * scale for k, t in state.items()}))
        assert all(torch.allclose(t, FedAvg().aggregate_train(start, clipped)[k], rtol=1e-5, atol=1e-8)
                   for k, t in last.state.items())
        assert not all(torch.allclose(t, FedAvg().aggregate_train(start, raw)[k], rtol=1e-5, atol=1e-8)
                       for k, t in last.state.items())
    if m.client.get("proximal_mu"):  # the proximal pull reached training: each update is shorter than with mu = 0
        plain = make_trainer(run.global_trainer.base, "lora", LORA.to_json())
        for node, verdict in zip(run.fed.nodes, run.results[0].verdicts, strict=True):
            state, _ = plain.train(node.client.train, replace(TRAIN, seed=TRAIN.seed + 1), run.initial, progress=False)
            assert verdict.update_norm < 0.95 * update_norm(state, run.initial)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_on_the_embedded_platform_and_audits(name, tmp_path, icd_base, clients):
    check_method(run_and_audit(name, icd_base, clients, EmbeddedStore(tmp_path / "store")))


# the float16, bfloat16 and sparse encodings take int8's code path through storage and the chain
@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("fp16", "bf16", "int8-top10")])
def test_method_runs_on_the_local_stack_and_audits(name, local_stack, icd_base, clients):
    anvil, ipfs = local_stack
    check_method(run_and_audit(name, icd_base, clients, IpfsHttpStore(ipfs.api_url, timeout_s=30),
                               connect(anvil.url)))


# ---------------------------------------------------------------- verification of the methods' rules


def _round_with(run: Run, forge) -> dict[str, Reason]:
    """A round where the first node submits honestly and the others submit what `forge(node, rec)` gives."""
    rec = run.fed.open()
    honest, *others = run.fed.nodes
    honest.participate(rec)
    for node in others:
        state, config = forge(node, rec)
        meta = adapter_metadata(run.fed.federation_id, rec.round_id, node.address, run.rules.base_model, config,
                                "update")
        node.publish_and_submit(rec.round_id, pack_adapter(state, meta), 16, metrics_for(node, rec.round_id, 16))
    result = run.fed.finalize(rec)
    return {v.submission.node: v.reason for v in result.verdicts}


def test_frozen_a_is_enforced(tmp_path, icd_base, clients):
    run = Run("ffa", icd_base, clients, EmbeddedStore(tmp_path / "store"))

    def moved_a(node, rec):
        state = {k: v.clone() for k, v in run.initial.items()}
        key = next(k for k in state if ".lora_A." in k)
        state[key][0, 0] += 1e-3
        return state, run.rules.lora

    verdicts = _round_with(run, moved_a)
    assert sorted(verdicts.values()) == [Reason.ACCEPTED, Reason.FROZEN_CHANGED, Reason.FROZEN_CHANGED]


def test_ranks_are_checked_against_the_rule(tmp_path, icd_base, clients):
    exact = Run("hetero_ranks", icd_base, clients, EmbeddedStore(tmp_path / "exact"))
    big = LoraSettings(r=16)
    too_big = make_state(exact.global_trainer, big)

    def over_rank(node, rec):
        return too_big, big.to_json()

    assert sorted(_round_with(exact, over_rank).values()) == [Reason.ACCEPTED, Reason.SHAPE_MISMATCH,
                                                               Reason.SHAPE_MISMATCH]
    plain = Run("fedavg", icd_base, clients, EmbeddedStore(tmp_path / "plain"))
    small = LoraSettings(r=4)
    low = make_state(plain.global_trainer, small)

    def lower_rank(node, rec):  # plain FedAvg cannot average other ranks; the config says so
        return low, small.to_json()

    assert sorted(_round_with(plain, lower_rank).values()) == [Reason.ACCEPTED, Reason.SHAPE_MISMATCH,
                                                               Reason.SHAPE_MISMATCH]

    def garbled(node, rec):
        return run_state(plain), {"r": "eight"}

    assert sorted(_round_with(plain, garbled).values()) == [Reason.ACCEPTED, Reason.BAD_METADATA,
                                                            Reason.BAD_METADATA]


def run_state(run: Run) -> dict:
    return {k: v.clone() for k, v in run.initial.items()}


def make_state(trainer, lora: LoraSettings) -> dict:
    """An adapter of another rank on the trainer's modules (A random, B small)."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for key, t in trainer.adapter_state().items():
        shape = (lora.r, t.shape[1]) if ".lora_A." in key else (t.shape[0], lora.r)
        out[key] = torch.randn(shape, generator=gen) * 0.01
    return out


def test_lora_exact_audit_accepts_rounding_within_the_declared_tolerance_only(tmp_path, icd_base, clients):
    """A global adapter that differs from the recomputation by float rounding (as another BLAS build's SVD would)
    verifies with a note naming the tolerance; a real change is a mismatch."""
    run = Run("lora_exact", icd_base, clients, EmbeddedStore(tmp_path / "store"))
    agg = run.fed.aggregator
    for scale in (2e-7, 1e-3):  # float32 rounding-sized vs a real change
        rec = run.fed.open()
        for node in run.fed.nodes:
            node.participate(rec)
        start, verdicts = agg.verify(rec)  # the aggregator merges honestly, then publishes a perturbed merge
        merged = run.rules.strategy().aggregate_train(start, [
            WeightedUpdate(v.submission.index, v.submission.num_samples, v.state, v.adapter_config)
            for v in verdicts])
        bumped = {k: t * (1 + scale) for k, t in merged.items()}
        _, cid_digest, sha = agg.publish_global(rec.round_id, bumped)
        agg.fed.finalize(rec.round_id, cid_digest, sha, bytes(len(verdicts)))
        run.fed.base = (cid_digest, sha)
    report = run_audit(run.fed.w3, run.fed.deployment, run.store, verify=True)
    small, large = report.rounds
    assert small.status == Status.VERIFIED and any("declared tolerance" in n for n in small.notes), small
    assert large.status == Status.MISMATCH


# ---------------------------------------------------------------- rules, private adapters, config


def test_rules_refuse_what_cannot_be_applied():
    base = "ab" * 32
    for kwargs, needle in [({"adapter": "prompt", "lora": PROMPT.to_json(), "aggregation": "lora_exact"},
                            "lora_exact"),
                           ({"adapter": "prompt", "lora": PROMPT.to_json(), "client": {"freeze_a": True}},
                            "freeze_a"),
                           ({"adapter": "adapterx"}, "adapter must be one of"),
                           ({"adapter": "prompt"}, "num_virtual_tokens"),
                           ({"client": {"mu": 1}}, "no setting 'mu'"),
                           ({"client": {"proximal_mu": -1}}, "proximal_mu"),
                           ({"client": {"orthogonal_lambda": 1.0}}, "local_rank")]:
        with pytest.raises(RulesError, match=needle) as exc:
            FederationRules(**{"base_model": base, "lora": LORA.to_json(), **kwargs})
        assert "\n" not in str(exc.value)
    plain = FederationRules(base_model=base, lora=LORA.to_json())
    prox = replace(plain, client={"proximal_mu": 0.1})
    assert plain.digest() != prox.digest() and prox.objective.proximal_mu == 0.1
    with pytest.raises(MethodError, match="unknown method"):
        method("fedsgd")


def test_private_adapter_survives_a_restart_and_is_never_published(tmp_path, icd_base, clients):
    private = tmp_path / "private"
    run = Run("personalized", icd_base, clients, EmbeddedStore(tmp_path / "store"), private_dir=private)
    run.round()
    node = run.fed.nodes[0]
    saved = node.private.latest_before(2)
    restarted = Node(node.fed, node.store, node.trainer, node.client, node.rules, TRAIN, private_dir=private)
    again = restarted.personal_state(2)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert any(not torch.equal(again[k], node.trainer.initial_local_state(0)[k]) for k in again if "lora_B" in k)
    stored = [p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert stored and len(list(private.rglob("round-1.safetensors"))) == len(clients)
    for t in saved.values():  # nothing in the shared store holds a private tensor
        assert not any(t.numpy().tobytes() in data for data in stored)


def test_config_names_the_method_settings(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[federation]\naggregation = "lora_exact"\nglobal_rank = 8\nclient = {proximal_mu = 0.1}\n'
                    '[lora]\nr = 4\n')
    config = load_config(path)
    assert config.adapter_config["r"] == 4 and config.global_adapter_config["r"] == 8
    assert config.federation.client == {"proximal_mu": 0.1}
    prompt = tmp_path / "prompt.toml"
    prompt.write_text('[federation]\nadapter = "prompt"\n[prompt]\nnum_virtual_tokens = 4\n')
    assert load_config(prompt).adapter_config == {"num_virtual_tokens": 4}
    bad = tmp_path / "bad.toml"
    bad.write_text('[prompt]\nnum_virtual_tokens = 0\n')
    with pytest.raises(ConfigError, match=r"\[prompt\] num_virtual_tokens"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[federation]\nclient = {mu = 1}\n')
    with pytest.raises(ConfigError, match=r"\[federation\] client.*no setting 'mu'"):
        load_config(wrong)
