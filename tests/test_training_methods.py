"""Client objectives in local training (FedProx, FFA-LoRA, personalized orthogonal LoRA), prompt tuning and the
trainer factory, on the tiny base model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_training import QA

from fednode.learning.adapters import LoraTrainer, PromptTrainer, make_trainer
from fednode.learning.settings import (
    ClientObjective,
    LoraSettings,
    PromptSettings,
    TrainSettings,
)
from fednode.learning.training import TrainingError

LORA = LoraSettings()
SHORT = TrainSettings(steps=20, batch_size=8)
PERSONAL = ClientObjective(local_rank=4, orthogonal_lambda=10.0)


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plain(tiny_base):
    return LoraTrainer(tiny_base, LORA)


@pytest.fixture(scope="module")
def personal(tiny_base):
    return LoraTrainer(tiny_base, LORA, PERSONAL)


@pytest.fixture(scope="module")
def prompt(tiny_base):
    return PromptTrainer(tiny_base, PromptSettings(num_virtual_tokens=8))


# --- FedProx and FFA-LoRA ------------------------------------------------------------------------


def test_fedprox_keeps_the_update_close_to_its_start_and_mu_zero_is_plain_training(tiny_base, plain):
    start = plain.initial_state(0)
    free, free_metrics = plain.train(QA, SHORT, start, progress=False)
    zero, _ = LoraTrainer(tiny_base, LORA, ClientObjective(proximal_mu=0.0)).train(QA, SHORT, start, progress=False)
    assert identical(zero, free) and "proximal" not in free_metrics
    prox = LoraTrainer(tiny_base, LORA, ClientObjective(proximal_mu=100.0))
    held, metrics = prox.train(QA, SHORT, start, progress=False)
    assert distance(held, start) < 0.1 * distance(free, start), (distance(held, start), distance(free, start))
    assert metrics["proximal"] == pytest.approx(distance(held, start) ** 2, rel=1e-4)
    again, _ = prox.train(QA, SHORT, start, progress=False)
    assert identical(again, held)


def test_ffa_lora_trains_b_only_and_leaves_a_bit_identical(tiny_base, plain):
    start = plain.initial_state(0)
    ffa = LoraTrainer(tiny_base, LORA, ClientObjective(freeze_a=True))
    state, _ = ffa.train(QA, SHORT, start, progress=False)
    a_keys = [k for k in state if ".lora_A." in k]
    assert a_keys and all(torch.equal(state[k], start[k]) for k in a_keys)
    assert all(torch.count_nonzero(state[k]) > 0 for k in state if ".lora_B." in k)  # every B left zero
    assert ffa.evaluate(QA, state)["loss"] < ffa.evaluate(QA, start)["loss"] - 0.5


# --- personalized orthogonal LoRA ----------------------------------------------------------------


def test_personalized_training_trains_both_adapters_and_publishes_only_the_shared_one(personal, plain):
    start, local = personal.initial_state(0), personal.initial_local_state(1)
    assert list(personal.initial_state(0)) == list(plain.initial_state(0))  # published keys unchanged
    assert all(t.shape[0] == PERSONAL.local_rank for k, t in local.items() if ".lora_A." in k)
    assert all(torch.count_nonzero(t) == 0 for k, t in local.items() if ".lora_B." in k)
    state, trained_local, metrics = personal.train_personal(QA, SHORT, start, local, progress=False)
    assert distance(state, start) > 0.5 and distance(trained_local, local) > 0.5
    assert identical(personal.adapter_state(), state) and identical(personal.local_state(), trained_local)
    again = personal.train_personal(QA, SHORT, start, local, progress=False)
    assert identical(again[0], state) and identical(again[1], trained_local) and again[2]["orthogonality"] == \
        metrics["orthogonality"]


def test_orthogonality_penalty_lowers_the_overlap_of_the_adapters(tiny_base, personal):
    start, local = personal.initial_state(0), personal.initial_local_state(1)
    free = LoraTrainer(tiny_base, LORA, ClientObjective(local_rank=4))
    free_overlap = free.train_personal(QA, SHORT, start, local, progress=False)[2]["orthogonality"]
    overlap = personal.train_personal(QA, SHORT, start, local, progress=False)[2]["orthogonality"]
    assert overlap < 0.1 * free_overlap, (overlap, free_overlap)


def test_personalized_evaluation_uses_the_private_adapter_only_when_given(personal, plain):
    state, local, _ = personal.train_personal(QA, SHORT, personal.initial_state(0), personal.initial_local_state(1),
                                              progress=False)
    shared = personal.evaluate(QA, state)
    assert shared == plain.evaluate(QA, state)  # without local_state: the shared adapter alone
    both = personal.evaluate(QA, state, local_state=local)
    assert both["loss"] < shared["loss"]
    scores = personal.score(QA, state, local_state=local)
    assert -sum(s for s, _ in scores) / sum(n for _, n in scores) == pytest.approx(both["loss"], rel=1e-5)
    assert personal.evaluate(QA, state) == shared  # the private adapter is switched off again


def test_personalized_training_refuses_the_wrong_entry_point(personal, plain):
    start = personal.initial_state(0)
    with pytest.raises(TrainingError, match="use train_personal"):
        personal.train(QA, SHORT, start, progress=False)
    with pytest.raises(TrainingError, match="needs the private adapter's local_state"):
        personal.train_personal(QA, SHORT, start, None, progress=False)
    with pytest.raises(TrainingError, match="no private adapter"):
        plain.train_personal(QA, SHORT, start, personal.initial_local_state(0), progress=False)
    with pytest.raises(TrainingError, match="no private adapter"):
        plain.evaluate(QA, start, local_state=personal.initial_local_state(0))
    with pytest.raises(TrainingError, match="private adapter tensor .* has shape"):
        personal.load_local_state(start)  # same keys, but the shared adapter's rank


# --- prompt tuning -------------------------------------------------------------------------------


def test_prompt_state_is_seeded_rows_of_the_input_embeddings(prompt, tiny_base):
    state = prompt.initial_state(0)
    assert list(state) == ["prompt_embeddings"]
    emb = state["prompt_embeddings"]
    assert emb.shape == (8, tiny_base.model.config.hidden_size) and emb.dtype == torch.float32
    vocab = tiny_base.model.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in emb)
    assert torch.equal(prompt.initial_state(0)["prompt_embeddings"], emb)
    assert not torch.equal(prompt.initial_state(1)["prompt_embeddings"], emb)
    prompt.load_adapter_state(state)
    assert identical(prompt.adapter_state(), state)
    with pytest.raises(TrainingError, match="shape"):
        prompt.load_adapter_state({"prompt_embeddings": emb[:4]})


def test_prompt_evaluation_is_the_base_model_reading_the_virtual_tokens_first(prompt, tiny_base):
    """The definition of prompt tuning, computed by hand: the base model on [prompt embeddings; input embeddings],
    the completion scored at the input's own positions."""
    state, example, tok = prompt.initial_state(2), QA[0], tiny_base.tokenizer
    prompt_ids = [tok.bos_token_id, *tok(example.prompt, add_special_tokens=False)["input_ids"]]
    completion_ids = [*tok(example.completion, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    embeds = torch.cat([state["prompt_embeddings"][None], tiny_base.model.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        logits = tiny_base.model(inputs_embeds=embeds).logits[0, 8:]
    expected = F.cross_entropy(logits[len(prompt_ids) - 1:-1], torch.tensor(completion_ids)).item()
    got = prompt.evaluate([example], state)
    assert got["tokens"] == len(completion_ids) and got["loss"] == pytest.approx(expected, rel=1e-5)


def test_prompt_tuning_lowers_the_loss_and_is_deterministic(prompt, plain):
    start = prompt.initial_state(0)
    before = prompt.evaluate(QA, start)
    state, metrics = prompt.train(QA, SHORT, start, progress=False)
    after = prompt.evaluate(QA, state)
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["tokens"] == before["tokens"] == plain.evaluate(QA, plain.initial_state(0))["tokens"]
    assert metrics["steps"] == SHORT.steps
    torch.manual_seed(999)  # the caller's RNG must not matter
    again, _ = prompt.train(QA, SHORT, start, progress=False)
    assert identical(again, state)
    scores = prompt.score(QA, state)
    assert -sum(s for s, _ in scores) / sum(n for _, n in scores) == pytest.approx(after["loss"], rel=1e-5)
    assert prompt.evaluate_base(QA) == plain.evaluate_base(QA)  # no virtual tokens, nothing dropped


def test_prompt_tuning_with_fedprox_stays_closer_to_its_start(tiny_base, prompt):
    start = prompt.initial_state(0)
    free, _ = prompt.train(QA, SHORT, start, progress=False)
    prox = PromptTrainer(tiny_base, PromptSettings(num_virtual_tokens=8), ClientObjective(proximal_mu=100.0))
    held, metrics = prox.train(QA, SHORT, start, progress=False)
    assert distance(held, start) < 0.5 * distance(free, start), (distance(held, start), distance(free, start))
    assert metrics["proximal"] > 0


def test_prompt_tuning_refuses_lora_only_objectives(tiny_base):
    for objective in (ClientObjective(freeze_a=True), ClientObjective(local_rank=2)):
        with pytest.raises(TrainingError, match="LoRA only"):
            PromptTrainer(tiny_base, PromptSettings(), objective)


# --- the factory ---------------------------------------------------------------------------------


def test_make_trainer_builds_each_adapter_type_from_its_config(tiny_base):
    lora = make_trainer(tiny_base, "lora", LoraSettings(r=4).to_json(), ClientObjective(freeze_a=True))
    assert isinstance(lora, LoraTrainer) and lora.adapter_type == "lora" and lora.objective.freeze_a
    assert lora.adapter_config == LoraSettings(r=4).to_json()
    tuned = make_trainer(tiny_base, "prompt", {"num_virtual_tokens": 3})
    assert isinstance(tuned, PromptTrainer) and tuned.adapter_type == "prompt"
    assert tuned.adapter_config == {"num_virtual_tokens": 3}
    assert tuned.initial_state(0)["prompt_embeddings"].shape[0] == 3


def test_make_trainer_errors_are_one_line(tiny_base):
    with pytest.raises(TrainingError, match="unknown adapter type 'ia3'"):
        make_trainer(tiny_base, "ia3", {})
    with pytest.raises(TrainingError, match="bad lora adapter config: .*exactly"):
        make_trainer(tiny_base, "lora", {"r": 8})
    with pytest.raises(TrainingError, match="bad lora adapter config: .*rank"):
        make_trainer(tiny_base, "lora", {**LORA.to_json(), "r": 0})
    with pytest.raises(TrainingError, match="bad prompt adapter config: .*num_virtual_tokens"):
        make_trainer(tiny_base, "prompt", {"num_virtual_tokens": 0})
    with pytest.raises(TrainingError, match="bad prompt adapter config"):
        make_trainer(tiny_base, "prompt", LORA.to_json())
    with pytest.raises(TrainingError, match="cannot attach LoRA"):
        make_trainer(tiny_base, "lora", {**LORA.to_json(), "target_modules": ["nope_proj"]})
