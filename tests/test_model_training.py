"""The tiny base model, LoRA training/evaluation and peft export, on a small built-in medical corpus."""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import pytest
import torch
from peft import PeftModel
from support import CORPUS, PAIRS, TEMPLATES

from fednode.learning.adapters import LoraTrainer
from fednode.learning.models import (
    ModelError,
    TinySpec,
    build_tiny,
    load_base_model,
    load_tiny,
    model_identity,
    weights_digest,
)
from fednode.learning.settings import LoraSettings, SettingsError, TrainSettings
from fednode.learning.training import TrainingError
from fednode.ops.export import export_global

# known sentence shapes, unseen condition/drug combinations
HELD_OUT = [TEMPLATES[i % 3].format(cond=c, drug=PAIRS[(i + 5) % len(PAIRS)][1]) for i, (c, _) in enumerate(PAIRS)]


class Pair(NamedTuple):
    prompt: str
    completion: str


QA = [Pair(f"Question: which drug treats {c}?\nAnswer:", f" {d}") for c, d in PAIRS]
LORA = LoraSettings()
QUICK = TrainSettings(steps=30, batch_size=8)


@pytest.fixture(scope="session")
def trainer(tiny_base):
    return LoraTrainer(tiny_base, LORA)


def _text_loss(model, tokenizer, texts: list[str]) -> float:
    """Token-mean next-token loss over whole texts (bos text eos)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                                 tokenizer.eos_token_id]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


# --- base model ----------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_and_has_fixed_special_ids(tiny_base):
    tok = tiny_base.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in CORPUS[:5] + ["Temp 38.5 °C, naïve to β-blockers; 50 µg/day — résumé ok.", " leading  spaces\n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert not {0, 1, 2} & set(ids)


def test_pretrained_base_beats_random_init_on_held_out_text(tiny_base):
    assert not set(HELD_OUT) & set(CORPUS)
    torch.manual_seed(0)
    random_model = type(tiny_base.model)(tiny_base.model.config).eval()
    pretrained = _text_loss(tiny_base.model, tiny_base.tokenizer, HELD_OUT)
    untrained = _text_loss(random_model, tiny_base.tokenizer, HELD_OUT)
    assert pretrained < untrained - 2.0, (pretrained, untrained)


def test_cached_base_reloads_identically_without_leftovers(tiny_base, tiny_cache):
    again = load_base_model("tiny", tiny_cache, corpus=lambda: CORPUS, seed=0)
    assert again.digest == tiny_base.digest == weights_digest(again.model)
    entries = list(tiny_cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("tiny-")  # no temporary build directory left behind


def test_tiny_build_is_deterministic_and_keyed_by_its_inputs(tmp_path):
    spec = TinySpec(pretrain_steps=3)
    a = load_tiny(tmp_path / "a", CORPUS, seed=0, spec=spec)
    b = load_tiny(tmp_path / "b", CORPUS, seed=0, spec=spec)
    c = load_tiny(tmp_path / "a", CORPUS, seed=1, spec=spec)
    d = load_tiny(tmp_path / "a", CORPUS[:-1], seed=0, spec=spec)
    assert a.digest == b.digest
    assert len({a.digest, c.digest, d.digest}) == 3
    assert len(list((tmp_path / "a").iterdir())) == 3
    model, _ = build_tiny(CORPUS, 0, spec)
    assert weights_digest(model) == a.digest  # what the cache holds is exactly what was built


def test_weights_digest_sees_a_single_changed_element(tiny_base):
    model = copy.deepcopy(tiny_base.model)
    assert weights_digest(model) == tiny_base.digest
    with torch.no_grad():
        model.model.norm.weight[3] += 1e-6
    assert weights_digest(model) != tiny_base.digest


def test_base_model_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="unknown base model 'gpt9'"):
        load_base_model("gpt9", tmp_path)
    with pytest.raises(ModelError, match="needs a corpus"):
        load_base_model("tiny", tmp_path)
    with pytest.raises(ModelError, match="non-empty"):
        load_base_model("tiny", tmp_path, corpus=lambda: ["ok", ""])


def test_model_identity_binds_base_and_adapter_config():
    ident = model_identity("ab" * 32, LORA.to_json())
    assert len(ident) == 32
    assert ident == model_identity("ab" * 32, dict(reversed(list(LORA.to_json().items()))))
    reordered = LoraSettings(target_modules=("v_proj", "o_proj", "q_proj", "k_proj"))
    assert ident == model_identity("ab" * 32, reordered.to_json())
    assert ident != model_identity("ab" * 32, LoraSettings(r=4).to_json())
    assert ident != model_identity("cd" * 32, LORA.to_json())


# --- LoRA settings and state -------------------------------------------------------------------


def test_lora_settings_json_round_trip_and_validation():
    assert LoraSettings.from_json(LORA.to_json()) == LORA
    with pytest.raises(SettingsError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(SettingsError, match="exactly"):
        LoraSettings.from_json({"r": 8})
    with pytest.raises(SettingsError, match="max_length must be >= 2"):
        TrainSettings(max_length=1)
    with pytest.raises(SettingsError, match="lr must be > 0"):
        TrainSettings(lr=0.0)


def test_adapter_state_names_are_stable_and_float32(trainer, tiny_base):
    state = trainer.initial_state(0)
    layers = tiny_base.model.config.num_hidden_layers
    assert len(state) == layers * len(LORA.target_modules) * 2
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert not any(".default." in name for name in state)
    assert list(state) == sorted(state)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_initial_state_is_seeded_peft_init_and_equals_the_base(trainer):
    s0, s0_again, s1 = trainer.initial_state(0), trainer.initial_state(0), trainer.initial_state(1)
    assert all(torch.equal(s0[k], s0_again[k]) for k in s0)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if ".lora_A." in k)
    assert all(torch.count_nonzero(v) == 0 for k, v in s0.items() if ".lora_B." in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in s0.items() if ".lora_A." in k)
    assert trainer.evaluate(QA, s0) == trainer.evaluate_base(QA)  # B = 0: the adapter is a no-op


def test_load_adapter_state_is_strict(trainer):
    state = trainer.initial_state(0)
    key = min(state)
    with pytest.raises(TrainingError, match="missing"):
        trainer.load_adapter_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(TrainingError, match="unexpected"):
        trainer.load_adapter_state({**state, "extra.lora_A.weight": state[key]})
    with pytest.raises(TrainingError, match="shape"):
        trainer.load_adapter_state({**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])})
    trainer.load_adapter_state(state)
    assert all(torch.equal(state[k], v) for k, v in trainer.adapter_state().items())


# --- training and evaluation ---------------------------------------------------------------------


def test_lora_training_lowers_loss_on_its_own_data(trainer, tiny_base):
    start = trainer.initial_state(0)
    before = trainer.evaluate(QA, start)
    state, metrics = trainer.train(QA, QUICK, start, progress=False)
    after = trainer.evaluate(QA, state)
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert before["tokens"] == after["tokens"] > len(QA)  # completion tokens + eos only
    assert metrics["steps"] == QUICK.steps and metrics["samples"] == len(QA) and metrics["tokens"] > 0
    assert math.isfinite(metrics["train_loss"]) and metrics["seconds"] > 0
    assert weights_digest(tiny_base.model) == tiny_base.digest  # the shared base model is never modified


def test_training_is_bit_identical_for_the_same_inputs(trainer):
    start = trainer.initial_state(3)
    settings = TrainSettings(steps=6, batch_size=4, seed=7)
    first, m1 = trainer.train(QA, settings, start, progress=False)
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    trainer.train(QA, TrainSettings(steps=2, seed=1), trainer.initial_state(5), progress=False)
    second, m2 = trainer.train(QA, settings, start, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert m1["train_loss"] == m2["train_loss"]
    other, _ = trainer.train(QA, TrainSettings(steps=6, batch_size=4, seed=8), start, progress=False)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed orders the data


def test_training_with_dropout_is_deterministic_under_its_seed(tiny_base):
    dropout = LoraTrainer(tiny_base, LoraSettings(dropout=0.1))
    start = dropout.initial_state(0)
    runs = [dropout.train(QA, TrainSettings(steps=3, batch_size=16), start, progress=False)[0] for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_only_completion_tokens_are_scored_and_long_prompts_are_cut_from_the_left(trainer):
    start = trainer.initial_state(0)
    same_prompt = [Pair("Question: which drug treats gout?\nAnswer:", " allopurinol")]
    long_prompt = [Pair("Question: which drug treats gout?" * 20 + "\nAnswer:", " allopurinol")]
    scored = trainer.evaluate(same_prompt, start, max_length=16)["tokens"]
    assert trainer.evaluate(long_prompt, start, max_length=16)["tokens"] == scored  # prompt is cut from the left
    completion_only = len(trainer.base.tokenizer(" allopurinol", add_special_tokens=False)["input_ids"]) + 1
    assert scored == completion_only


def test_lora_on_missing_modules_is_refused(tiny_base):
    with pytest.raises(TrainingError, match="cannot attach LoRA"):
        LoraTrainer(tiny_base, LoraSettings(target_modules=("no_such_proj",)))


def test_training_rejects_empty_data(trainer):
    with pytest.raises(TrainingError, match="no examples"):
        trainer.train([], QUICK, trainer.initial_state(0), progress=False)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_export_global_loads_with_peft_and_matches_trainer_logits(trainer, tiny_base, tmp_path):
    state, _ = trainer.train(QA, TrainSettings(steps=5), trainer.initial_state(0), progress=False)
    export_global(state, tiny_base, LORA, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), tmp_path / "adapter").eval()
    ids = tiny_base.tokenizer([QA[0].prompt + QA[0].completion], return_tensors="pt")["input_ids"]
    trainer.load_adapter_state(state)
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = tiny_base.model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base)  # the adapter really changed the model
