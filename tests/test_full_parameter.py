"""Full-parameter rounds (`adapter = "full"`) and the pretrain loss: the trainer, the rules, a federation through
the embedded platform with honest and dishonest hospitals, server optimizers, the audit, and the export."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from support import metrics_for

from fednode.audit import run_audit
from fednode.learning.adapters import FullTrainer, make_trainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import (ClientObjective, FullSettings, LoraSettings, PromptSettings, SettingsError,
                                       TrainSettings)
from fednode.learning.training import TrainingError
from fednode.ops.embedded import EmbeddedFederation, method_trainers
from fednode.ops.export import export_global
from fednode.protocol.methods import method
from fednode.protocol.packaging import adapter_metadata, pack_adapter, unpack_adapter
from fednode.protocol.rules import LEGACY, FederationRules, RulesError
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore

PRETRAIN = ClientObjective(loss="pretrain")
TRAIN = TrainSettings(steps=6, batch_size=8, lr=3e-4)


@pytest.fixture(scope="module")
def clients():
    return build_clients(DataConfig(num_clients=3, train_per_client=256, eval_per_client=24))


@pytest.fixture(scope="module")
def pretrainer(icd_base):
    return FullTrainer(icd_base, FullSettings(), PRETRAIN)


def test_the_full_state_is_every_weight_of_the_base_and_training_moves_them_all(icd_base, pretrainer, clients):
    initial = pretrainer.initial_state(0)
    weights = dict(icd_base.model.named_parameters())
    assert sorted(initial) == sorted(weights)
    assert all(torch.equal(initial[n], weights[n].detach()) for n in weights)
    state, metrics = pretrainer.train(clients[0].train, TRAIN, initial, progress=False)
    moved = [n for n in state if not torch.equal(state[n], initial[n])]
    assert len(moved) == len(state), f"unchanged: {sorted(set(state) - set(moved))[:3]}"
    assert all(torch.equal(initial[n], weights[n].detach()) for n in weights), "training touched the base model"
    assert metrics["steps"] == TRAIN.steps


def test_the_pretrain_loss_scores_every_token_and_the_completion_loss_only_the_completion(icd_base, pretrainer,
                                                                                          clients):
    examples = clients[0].eval[:8]
    completion = FullTrainer(icd_base, FullSettings())
    tok = icd_base.tokenizer
    every = sum(len(tok(e.prompt + e.completion, add_special_tokens=False)["input_ids"]) for e in examples)
    tail = sum(len(tok(e.completion, add_special_tokens=False)["input_ids"]) for e in examples)
    state = pretrainer.initial_state(0)
    scored = pretrainer.evaluate(examples, state)["tokens"]
    # + eos per example; - nothing before the first token (bos absent: the first token is not predicted)
    bos = int(tok.bos_token_id is not None)
    assert scored == every + len(examples) * (bos + 1) - len(examples)
    assert completion.evaluate(examples, state)["tokens"] == tail + len(examples)
    assert pretrainer.evaluate_base(examples) == pretrainer.evaluate(examples, state)


def test_full_training_refuses_what_only_lora_or_per_example_gradients_have(icd_base):
    for objective in (ClientObjective(freeze_a=True), ClientObjective(local_rank=2)):
        with pytest.raises(TrainingError, match="LoRA only"):
            FullTrainer(icd_base, FullSettings(), objective)
    with pytest.raises(TrainingError, match="bad full adapter config"):
        make_trainer(icd_base, "full", {"r": 8})
    with pytest.raises(SettingsError, match="loss must be one of completion, pretrain"):
        ClientObjective(loss="masked")
    rules = dict(base_model="00" * 32, lora={}, adapter="full")
    for bad, message in (({"aggregation": "lora_exact"}, "apply to LoRA adapters"),
                         ({"client": {"freeze_a": True}}, "apply to LoRA adapters"),
                         ({"privacy": {"mechanism": "dp_sgd", "max_grad_norm": 1.0, "noise_multiplier": 1.0,
                                       "delta": 1e-5, "steps": 5, "batch_size": 64}}, "per-example gradients"),
                         ({"lora": {"r": 8}}, "takes no adapter settings"),
                         ({"version": 1, **LEGACY}, "need rules version 2")):
        with pytest.raises(RulesError, match=message):
            FederationRules(**{**rules, **bad})
    with pytest.raises(RulesError, match="need rules version 2"):
        FederationRules(base_model="00" * 32, lora=LoraSettings().to_json(), client={"loss": "pretrain"}, version=1,
                        **LEGACY)


def _federation(tmp_path, base, clients, spec=method("pretrain"), attackers=0, **overrides):
    trainer, trainers = method_trainers(base, spec, LoraSettings(), PromptSettings(), len(clients) + attackers)
    rules = spec.rules(base.digest, LoraSettings(), PromptSettings(), TRAIN, **overrides)
    everyone = list(clients) + (build_clients(DataConfig(num_clients=attackers, train_per_client=32, eval_per_client=8,
                                                         seed=7)) if attackers else [])
    fed = EmbeddedFederation.create(trainers, everyone, rules, spec.train_settings(TRAIN),
                                    EmbeddedStore(tmp_path / "store"), first_account=300)
    initial = trainer.initial_state(0)
    fed.start(initial)
    return trainer, fed, initial


def test_federated_pretraining_lowers_every_hospitals_held_out_loss_and_audits_verified(tmp_path, icd_base,
                                                                                         clients):
    trainer, fed, initial = _federation(tmp_path, icd_base, clients, rounds=2)
    before = [trainer.evaluate(c.eval, initial)["loss"] for c in clients]
    for _ in range(2):
        run = fed.run_round(min_updates=3)
        assert [v.reason for v in run.result.verdicts] == [Reason.ACCEPTED] * 3
    after = [trainer.evaluate(c.eval, run.result.state)["loss"] for c in clients]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert run.updates[0].size > 4 * sum(v.numel() for v in initial.values())  # the whole model travels
    report = run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True)
    assert report.summary() == "audit: 2 rounds VERIFIED", report.summary()


def test_a_server_optimizer_merges_full_updates_and_the_audit_recomputes_it(tmp_path, icd_base, clients):
    """FedAdam over every weight: the audit re-derives the global model and the optimizer state bit for bit."""
    adam = method("fedadam")
    spec = replace(method("pretrain"), aggregation=adam.aggregation, params=adam.params)
    _, fed, _ = _federation(tmp_path, icd_base, clients, spec, rounds=2)
    for _ in range(2):
        assert len(fed.run_round(min_updates=3).result.accepted) == 3
    assert run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True).summary() == \
        "audit: 2 rounds VERIFIED"


def test_a_dishonest_hospitals_full_updates_are_rejected_by_name(tmp_path, icd_base, clients):
    """Their own wallets and bytes: a model missing one weight, one with a NaN, one claimed for another base, and an
    honest hospital's model re-labelled as the attacker's; the honest updates are merged and the audit agrees."""
    trainer, fed, initial = _federation(tmp_path, icd_base, clients[:2], attackers=4)
    honest, attackers = fed.nodes[:2], fed.nodes[2:]
    rec = fed.open(min_updates=2)
    submitted = [n.participate(rec) for n in honest]
    state, _ = trainer.train(attackers[0].client.train, TRAIN, initial, progress=False)
    rules = fed.aggregator.rules

    def meta(node, base_model=rules.base_model):
        return adapter_metadata(fed.federation_id, rec.round_id, node.address, base_model, rules.lora, "update")

    missing = {k: v for k, v in state.items() if k != sorted(state)[0]}
    nan = {**state, sorted(state)[-1]: torch.full_like(state[sorted(state)[-1]], float("nan"))}
    copied = unpack_adapter(fed.aggregator.store.get(submitted[0].cid), rules.max_adapter_bytes)[0]
    forged = (pack_adapter(missing, meta(attackers[0])), pack_adapter(nan, meta(attackers[1])),
              pack_adapter(state, meta(attackers[2], "ab" * 32)), pack_adapter(copied, meta(attackers[3])))
    for node, data in zip(attackers, forged, strict=True):
        n = len(node.client.train)
        node.publish_and_submit(rec.round_id, data, n, metrics_for(node, rec.round_id, n))
    result = fed.finalize(rec)
    reasons = {v.submission.node: v.reason for v in result.verdicts}
    assert [reasons[n.address] for n in honest] == [Reason.ACCEPTED] * 2
    assert [reasons[n.address] for n in attackers] == [Reason.SHAPE_MISMATCH, Reason.NON_FINITE,
                                                      Reason.WRONG_BASE_MODEL, Reason.COPIED], reasons
    assert run_audit(fed.w3, fed.deployment, fed.aggregator.store, verify=True).summary() == \
        "audit: 1 round VERIFIED"


def test_a_full_model_exports_as_a_transformers_folder_with_the_trainers_logits(tmp_path, icd_base, pretrainer,
                                                                               clients):
    from transformers import AutoModelForCausalLM

    from fednode.ops.generate import generate

    state, _ = pretrainer.train(clients[1].train, TRAIN, pretrainer.initial_state(0), progress=False)
    out = export_global(state, icd_base, FullSettings(), tmp_path / "model")
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = icd_base.tokenizer("ICD-10-CM code A00.0 means:", return_tensors="pt")["input_ids"]
    pretrainer.load_adapter_state(state)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, pretrainer.model(input_ids=ids).logits, atol=1e-5)
    assert isinstance(generate(out, "ICD-10-CM code A00.0 means:", max_new_tokens=4), str)
    assert "AutoModelForCausalLM" in (out / "README.md").read_text()


def test_a_hospital_config_for_full_rounds_must_allow_files_of_the_whole_model(tmp_path, model_cache):
    """`adapter = "full"` with max_adapter_bytes below the base's float32 size is a one-line config error before
    any training, not a round of updates the aggregator then refuses as TOO_LARGE."""
    from fednode.ops.config import ConfigError, load_config
    from fednode.ops.participant import Participant

    path = tmp_path / "hospital.toml"
    head = f'[model]\ncache_dir = "{model_cache}"\n[federation]\nadapter = "full"\n'
    path.write_text(head + "max_adapter_bytes = 100000\n")
    with pytest.raises(ConfigError, match=r"max_adapter_bytes = 100000 is below the \d+ bytes of a float32 full "
                                          r"update of tiny: raise it"):
        Participant(load_config(path)).trainer
    path.write_text(head + 'client = {loss = "pretrain"}\n')
    participant = Participant(load_config(path))
    assert participant.trainer.adapter_type == "full" and participant.rules.objective.loss == "pretrain"
