"""Update encodings: float16 / bfloat16 / blockwise int8 deltas, optionally top-k sparse, canonical and decoded the
same way everywhere; forged encodings are rejected with a reason; the bytes they save on SmolLM2's LoRA shapes."""
from __future__ import annotations

import json

import pytest
import torch
from support import metrics_for

from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.encoding import INDICES, METADATA_KEY, SCALES, EncodingError, UpdateEncoding
from fednode.protocol.packaging import adapter_metadata, pack_adapter
from fednode.protocol.rules import FederationRules, RulesError
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore

LORA = LoraSettings(r=4)


def states(seed: int = 0, scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    start = {"a.lora_A.weight": torch.randn(4, 200, generator=g), "b.lora_B.weight": torch.randn(70, 4, generator=g)}
    return start, {k: v + torch.randn(v.shape, generator=g) * scale for k, v in start.items()}


@pytest.mark.parametrize("dtype,bound", [("float16", 2 ** -11), ("bfloat16", 2 ** -8)])
def test_float_encodings_round_to_nearest(dtype, bound):
    start, state = states()
    enc = UpdateEncoding(dtype)
    decoded = enc.decode(enc.encode(state, start), start)
    for k in start:
        delta = state[k].double() - start[k].double()
        # the decoded delta is the delta rounded to the format (relative error at most half an ulp)
        assert torch.all((decoded[k] - start[k].double() - delta).abs() <= delta.abs() * bound + 1e-12)


def test_int8_blocks_and_top_k():
    start, state = states()
    enc = UpdateEncoding("int8", block_size=16)
    tensors = enc.encode(state, start)
    keys = sorted(start)
    assert tensors[keys[0]].dtype == torch.int8 and tensors[SCALES].shape == (50 + 18,)  # 800 / 16, 280 / 16
    decoded = enc.decode(tensors, start)
    for key, scales in zip(keys, torch.split(tensors[SCALES], [50, 18])):
        delta = (state[key].double() - start[key].double()).reshape(-1)
        step = scales.double().repeat_interleave(16)[:delta.numel()]
        error = decoded[key].reshape(-1) - start[key].double().reshape(-1) - delta
        assert torch.all(error.abs() <= step / 2 + 1e-12)
    sparse = UpdateEncoding("float32", top_k=0.1)
    tensors = sparse.encode(state, start)
    decoded = sparse.decode(tensors, start)
    for key, kept in zip(keys, torch.split(tensors[INDICES].long(), [80, 28])):
        delta = (state[key].double() - start[key].double()).reshape(-1)
        assert bool((kept[1:] > kept[:-1]).all())
        dropped = torch.ones(delta.numel(), dtype=torch.bool)
        dropped[kept] = False
        assert delta.abs()[kept].min() >= delta.abs()[dropped].max()  # the largest |delta| travel
        sent = torch.zeros_like(delta)
        sent[kept] = delta[kept].float().double()
        assert torch.equal(decoded[key].reshape(-1) - start[key].double().reshape(-1), sent)


def test_encodings_are_canonical_and_validated():
    start, state = states()
    for enc in (UpdateEncoding("float16"), UpdateEncoding("int8", top_k=0.2)):
        assert pack_adapter(enc.encode(state, start), {}) == pack_adapter(enc.encode(state, start), {})
    for bad, match in (({"dtype": "int4"}, "dtype"), ({"block_size": 0}, "block_size"), ({"top_k": 1.0}, "top_k"),
                       ({"sparsity": 0.1}, "unknown encoding parameter")):
        with pytest.raises(EncodingError, match=match):
            UpdateEncoding.from_rules(bad)
    with pytest.raises(RulesError, match="no secure_aggregation"):
        FederationRules(base_model="ab", lora=LORA.to_json(), copy_threshold=0, encoding={"dtype": "int8"},
                        secure_aggregation={"threshold": 0.6})
    plain = FederationRules(base_model="ab", lora=LORA.to_json())
    assert b"encoding" not in plain.to_bytes()  # documents without it keep their digests


def smollm2_lora(r: int = 8) -> dict[str, torch.Tensor]:
    """Zeros of SmolLM2-135M's LoRA shapes (30 layers; q, o: 576 x 576; k, v: 576 x 192)."""
    out = {}
    for layer in range(30):
        for module, width in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192), ("o_proj", 576)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.zeros(r, 576)
            out[f"{prefix}.lora_B.weight"] = torch.zeros(width, r)
    return out


def test_bytes_on_smollm2_shapes():
    start = smollm2_lora()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in start.items()}
    meta = adapter_metadata("0x" + "ab" * 20, 1, "0x" + "cd" * 20, "e" * 64, LORA.to_json(), "update")
    plain = len(pack_adapter(state, meta))
    ratio = {d: len(pack_adapter(UpdateEncoding(d).encode(state, start), meta)) / plain
             for d in ("float16", "bfloat16", "int8")}
    assert 0.49 < ratio["float16"] < 0.51 and 0.49 < ratio["bfloat16"] < 0.51
    assert ratio["int8"] <= 0.27, ratio


# ------------------------------------------------------------------ forged encodings, submitted for real


@pytest.fixture(scope="module")
def trainer(icd_base):
    return LoraTrainer(icd_base, LORA)


def test_forged_encodings_are_rejected(icd_base, trainer, tmp_path):
    clients = build_clients(DataConfig(num_clients=3, train_per_client=16, eval_per_client=8))
    encoding = {"dtype": "int8", "top_k": 0.5}
    rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), encoding=encoding)
    fed = EmbeddedFederation.create([trainer] * 3, clients, rules, TrainSettings(steps=3, batch_size=4),
                                    EmbeddedStore(tmp_path / "store"))
    fed.start(trainer.initial_state(0))
    rec = fed.open()
    honest, a, b = fed.nodes
    honest.participate(rec)
    start = fed.aggregator.start_adapter(rec)[0]
    state = {k: v + 0.01 for k, v in start.items()}
    good = UpdateEncoding(**encoding).encode(state, start)
    declared = UpdateEncoding(**encoding).declared()

    def submit(node, tensors, declared=declared):
        meta = adapter_metadata(fed.federation_id, rec.round_id, node.address, rules.base_model, rules.lora, "update",
                                {METADATA_KEY: declared})
        node.publish_and_submit(rec.round_id, pack_adapter(tensors, meta), 16, metrics_for(node, rec.round_id, 16))

    submit(a, {**good, SCALES: -good[SCALES]})                       # negative scales
    submit(b, good, declared=json.dumps({"dtype": "float16", "block_size": 64, "top_k": 0.5}))  # another encoding
    _, verdicts = fed.aggregator.verify(rec)
    assert [v.reason for v in verdicts] == [Reason.ACCEPTED, Reason.SHAPE_MISMATCH, Reason.BAD_METADATA]
    assert "scales must be finite" in verdicts[1].detail
    # indices that repeat or leave the tensor
    for forged in ({**good, INDICES: torch.zeros_like(good[INDICES])},
                   {**good, INDICES: good[INDICES] + 10_000}):
        with pytest.raises(EncodingError, match=INDICES):
            UpdateEncoding(**encoding).decode(forged, start)
