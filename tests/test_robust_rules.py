"""The robust rules against their formulas (numpy as the oracle), weight capping, the free-rider screening's
thresholds, and the schemas of the model card and the metrics document."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from fednode.protocol.documents import DocumentError, ModelCard, UpdateMetrics, fetch_document
from fednode.protocol.ledger import Submission
from fednode.protocol.publish import publish_json
from fednode.protocol.rules import FederationRules
from fednode.protocol.screening import screen
from fednode.protocol.verify import Reason, Verdict
from fednode.storage import EmbeddedStore
from fednode.strategies.base import WeightedUpdate, capped_shares
from fednode.strategies.registry import build
from fednode.strategies.robust import Krum, MultiKrum

LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]}


def updates(n: int, seed: int = 0, shape=(3, 5)) -> tuple[dict, list[WeightedUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    start = {"m.lora_A.weight": torch.randn(shape, generator=gen)}
    return start, [WeightedUpdate(i, 10 + i, {"m.lora_A.weight": start["m.lora_A.weight"] + torch.randn(
        shape, generator=gen)}) for i in range(n)]


@pytest.mark.parametrize("n", [4, 5, 7])
def test_median_and_trimmed_mean_are_the_numpy_formulas(n):
    start, ups = updates(n)
    stack = np.stack([u.state["m.lora_A.weight"].double().numpy() for u in ups])
    median = build("median", {}, "num_samples", LORA).aggregate_train(start, ups)["m.lora_A.weight"]
    assert np.array_equal(median.numpy(), np.median(stack, axis=0).astype(np.float32))
    trimmed = build("trimmed_mean", {"beta": 0.2}, "num_samples", LORA).aggregate_train(start, ups)
    k = int(0.2 * n)
    expected = np.sort(stack, axis=0)[k:n - k].mean(axis=0)
    assert np.allclose(trimmed["m.lora_A.weight"].numpy(), expected, rtol=1e-6, atol=0)
    if k == 0:  # nothing trimmed: the plain, unweighted mean
        assert np.allclose(trimmed["m.lora_A.weight"].numpy(), stack.mean(axis=0), rtol=1e-6)


def test_krum_picks_the_update_inside_the_cluster_and_multi_krum_the_m_best():
    start, ups = updates(6, seed=3)
    base = ups[0].state["m.lora_A.weight"]
    gen = torch.Generator().manual_seed(9)
    cluster = [WeightedUpdate(i, 10, {"m.lora_A.weight": base + 0.01 * torch.randn(base.shape, generator=gen)})
               for i in range(5)]
    outlier = WeightedUpdate(5, 10, {"m.lora_A.weight": base + 100.0})
    every = cluster + [outlier]
    krum = Krum(adapter_config=LORA, f=1)
    merged = krum.aggregate_train(start, every)
    [chosen] = krum.chosen
    assert chosen != 5 and torch.equal(merged["m.lora_A.weight"], every[chosen].state["m.lora_A.weight"])
    # the score by hand: squared distances to the n - f - 2 = 3 nearest others
    flat = [u.state["m.lora_A.weight"].double().reshape(-1) for u in every]
    scores = [sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(6) if j != i)[:3] for i in range(6)]
    assert chosen == min(range(6), key=lambda i: sum(scores[i]))
    multi = MultiKrum(adapter_config=LORA, f=1, m=3)
    multi.aggregate_train(start, every)
    assert sorted(multi.chosen) == sorted(sorted(range(6), key=lambda i: sum(scores[i]))[:3])
    assert 5 not in multi.chosen and multi.min_updates == 5
    with pytest.raises(Exception, match="at least 5 updates"):
        krum.aggregate_train(start, every[:4])


def test_capped_shares_cap_every_weight_and_keep_the_proportions_of_the_rest():
    shares = capped_shares([0.9, 0.05, 0.03, 0.02], 0.4)
    assert shares[0] == pytest.approx(0.4) and sum(shares) == pytest.approx(1.0)
    assert shares[1] / shares[2] == pytest.approx(0.05 / 0.03) and max(shares) <= 0.4 + 1e-12
    assert capped_shares([0.5, 0.5], 0.1) == pytest.approx([0.5, 0.5])  # a cap below 1/n cannot hold: uniform
    # water-filling: 0.7 is capped, 0.2 then gets 0.55 * 2/3 = 0.367 (under the cap) and 0.1 gets 0.183
    assert capped_shares([0.7, 0.2, 0.1], 0.45) == pytest.approx([0.45, 0.55 * 2 / 3, 0.55 / 3])


def verdict(index: int, state: dict, start: dict, config=None) -> Verdict:
    sub = Submission(block_number=1, tx_hash="0x", round_id=1, node=f"0x{index:040x}", index=index,
                     cid_digest=bytes(32), file_sha256=bytes(32), num_samples=1, metrics_digest=bytes(32))
    norm = float(sum(((state[k].double() - start[k].double()) ** 2).sum() for k in start)) ** 0.5
    return Verdict(sub, Reason.ACCEPTED, "", state, norm, config or LORA)


def test_screening_rejects_copies_within_the_threshold_and_keeps_the_first():
    start, ups = updates(3, seed=5)
    original = ups[0].state
    d = original["m.lora_A.weight"] - start["m.lora_A.weight"]
    size = float(d.norm())
    copy_inside = {"m.lora_A.weight": original["m.lora_A.weight"] + d / d.norm() * (0.009 * size)}
    copy_outside = {"m.lora_A.weight": original["m.lora_A.weight"] + d / d.norm() * (0.03 * size)}
    rules = FederationRules(base_model="00" * 32, lora=LORA, copy_threshold=0.01)
    got = screen([verdict(0, original, start), verdict(1, ups[1].state, start), verdict(2, copy_inside, start),
                  verdict(3, copy_outside, start), verdict(4, dict(start), start)], start, rules)
    assert [v.reason for v in got] == [Reason.ACCEPTED, Reason.ACCEPTED, Reason.COPIED, Reason.ACCEPTED,
                                       Reason.NO_CHANGE]
    assert "of update #0" in got[2].detail and got[2].state is None
    off = FederationRules(base_model="00" * 32, lora=LORA, copy_threshold=0.0)
    assert all(v.accepted for v in screen([verdict(0, original, start), verdict(1, original, start)], start, off))


def test_documents_must_fit_their_schema(tmp_path):
    store = EmbeddedStore(tmp_path)
    card = {"node": "0xabc", "hospital": "h", "base_model": "00", "adapter": LORA, "dataset_size": 12}
    _, digest = publish_json(store, card)
    assert fetch_document(store, digest, ModelCard).dataset_size == 12
    for broken, needle in (({**card, "dataset_size": 0}, "dataset_size"), ({**card, "dataset_size": "12"},
                                                                            "dataset_size"),
                           ({k: v for k, v in card.items() if k != "dataset_size"}, "dataset_size"),
                           ({**card, "extra": 1}, "extra")):
        _, digest = publish_json(store, broken)
        with pytest.raises(DocumentError, match=needle) as info:
            fetch_document(store, digest, ModelCard)
        assert not info.value.missing and "\n" not in str(info.value)
    nan = json.dumps({"round": 1, "node": "0x", "hospital": "h", "train_loss": float("nan"), "steps": 1,
                      "samples": 1, "tokens": 1, "global_eval_loss": 1.0, "global_eval_perplexity": 1.0}).encode()
    store.put(nan)
    with pytest.raises(DocumentError, match="train_loss"):
        fetch_document(store, hashlib.sha256(nan).digest(), UpdateMetrics)
    with pytest.raises(DocumentError) as info:
        fetch_document(store, bytes(31) + b"\x01", UpdateMetrics)
    assert info.value.missing
