"""SmolLM2-135M from the shipped GGUF and its safetensors cache (real model: slow)."""

import hashlib
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from fednode.learning.smollm2 import (
    CACHE_PREFIX,
    DIGEST_FILE,
    SmolLM2Error,
    _load_gguf,
    _sha256_with_sidecar,
    gguf_digest,
    gguf_path,
    load_smollm2,
)

TEXT = "Patient reports chest pain and shortness of breath."


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2") / "not" / "yet"


@pytest.fixture(scope="module")
def loaded(cache_dir):
    torch.set_num_threads(2)
    return load_smollm2(cache_dir)


@pytest.mark.slow
def test_missing_cache_dir_is_created_with_one_complete_entry(cache_dir, loaded):
    digest = loaded[2]
    assert [p.name for p in cache_dir.iterdir()] == [f"{CACHE_PREFIX}{digest[:16]}"]
    entry = cache_dir / f"{CACHE_PREFIX}{digest[:16]}"
    assert (entry / DIGEST_FILE).read_text().strip() == digest
    assert (entry / "model.safetensors").is_file()


@pytest.mark.slow
def test_loaded_model_is_float32_llama_in_eval_mode(loaded):
    model, _, _ = loaded
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_cached_model_matches_gguf_model(loaded):
    model, tokenizer, _ = loaded
    gguf_model, gguf_tokenizer = _load_gguf()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(TEXT, return_tensors="pt").input_ids)
    with torch.no_grad():
        cached_logits = model(ids).logits
        gguf_logits = gguf_model.eval()(ids).logits
    assert torch.allclose(cached_logits, gguf_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_second_load_reuses_cache(cache_dir, loaded):
    before = sorted(p.name for p in cache_dir.iterdir())
    model, _, digest = load_smollm2(cache_dir)
    assert digest == loaded[2]
    assert sorted(p.name for p in cache_dir.iterdir()) == before
    first = loaded[0].state_dict()
    assert all(torch.equal(t, first[name]) for name, t in model.state_dict().items())


@pytest.mark.slow
def test_tokenizer_pads_a_batch(loaded):
    _, tokenizer, _ = loaded
    assert tokenizer.pad_token is not None
    batch = tokenizer(["fever", TEXT], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()
    assert tokenizer.chat_template is not None


@pytest.mark.slow
def test_digest_is_stable_sha256_of_the_file(loaded):
    expected = hashlib.sha256(gguf_path().read_bytes()).hexdigest()
    assert gguf_digest() == gguf_digest() == loaded[2] == expected


@pytest.mark.slow
def test_sidecar_is_reused_only_while_file_is_unchanged(tmp_path):
    path = gguf_path()
    sidecar = tmp_path / "digest.json"
    real = _sha256_with_sidecar(path, sidecar)
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == real
    sidecar.write_text(json.dumps({**record, "sha256": "recorded"}))
    assert _sha256_with_sidecar(path, sidecar) == "recorded"
    sidecar.write_text(json.dumps({"key": {**record["key"], "size": 1}, "sha256": "stale"}))
    assert _sha256_with_sidecar(path, sidecar) == real


@pytest.mark.slow
def test_cache_built_from_another_gguf_is_refused(tmp_path):
    entry = tmp_path / f"{CACHE_PREFIX}{gguf_digest()[:16]}"
    entry.mkdir()
    (entry / DIGEST_FILE).write_text("0" * 64 + "\n")
    with pytest.raises(SmolLM2Error, match="was built from GGUF"):
        load_smollm2(tmp_path)
