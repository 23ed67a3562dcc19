"""Exact LoRA aggregation on plain tensors: the merge is the weighted mean of the products B @ A (exactly when its
rank fits, else its best rank-r approximation), plain FedAvg's error, heterogeneous ranks and alphas, a
deterministic sign-normalised SVD, weights and submission order, the auditor's tolerance, and the errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fednode.learning.lora_math import (
    LoraError,
    aggregation_error,
    lora_modules,
    products,
    refactor,
    refactor_sum,
    scale,
    truncate,
    weighted_mean,
)
from fednode.learning.settings import LoraSettings
from fednode.protocol.rules import FederationRules, RulesError
from fednode.strategies.base import AggregateError, WeightedUpdate
from fednode.strategies.fedavg import FedAvg
from fednode.strategies.lora_exact import LoraExact

SHAPES = {"base_model.model.model.layers.0.self_attn.q_proj": (12, 10),   # (out, in)
          "base_model.model.model.layers.0.self_attn.v_proj": (6, 10)}


def config(r: int, alpha: int | None = None) -> dict:
    return LoraSettings(r=r, alpha=alpha or 2 * r, target_modules=("q_proj", "v_proj")).to_json()


def lora_state(gen: torch.Generator, r: int, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random rank-r factors for every module (A given: the same A for every module of the first shape)."""
    state = {}
    for prefix, (out, inn) in SHAPES.items():
        state[f"{prefix}.lora_A.weight"] = torch.randn(r, inn, generator=gen) if a is None else a.clone()
        state[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=gen)
    return state


def dense_mean(updates: list[tuple[dict, dict]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The reference: sum_i w_i scale_i B_i @ A_i by plain matmul."""
    return {p: sum(w * scale(c) * (s[f"{p}.lora_B.weight"].double() @ s[f"{p}.lora_A.weight"].double())
                   for (s, c), w in zip(updates, weights)) for p in SHAPES}


def rel(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - reference.double()) / torch.linalg.norm(reference.double()))


def best_rank(m: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """numpy's rank-r SVD truncation and its relative residual."""
    u, s, vh = np.linalg.svd(m.numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :r] * s[:r]) @ vh[:r]), math.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())


def merge(global_config: dict, updates: list[WeightedUpdate], weighting: str = "num_samples", **params):
    strategy = LoraExact(weighting, adapter_config=global_config, **params)
    start = lora_state(torch.Generator().manual_seed(99), global_config["r"])
    return strategy.aggregate_train(start, updates), strategy


def test_pairs_products_and_scale():
    state = lora_state(torch.Generator().manual_seed(0), 3)
    assert lora_modules(state) == {p: (f"{p}.lora_A.weight", f"{p}.lora_B.weight") for p in SHAPES}
    assert scale(config(4, 32)) == 8.0
    for p, product in products(state, config(3, 5)).items():
        assert product.dtype == torch.float64
        torch.testing.assert_close(product, 5 / 3 * state[f"{p}.lora_B.weight"].double()
                                   @ state[f"{p}.lora_A.weight"].double(), rtol=1e-13, atol=1e-13)


def test_exact_merge_is_the_dense_mean_when_its_rank_fits():
    gen = torch.Generator().manual_seed(1)
    updates = [(lora_state(gen, 2), config(2)) for _ in range(2)]     # rank 2 + rank 2 <= global rank 4
    merged, strategy = merge(config(4), [WeightedUpdate(i, n, s, c) for i, (n, (s, c)) in
                                         enumerate(zip([3, 9], updates))])
    dense = dense_mean(updates, [0.25, 0.75])
    for p, product in products(merged, config(4)).items():
        assert rel(product, dense[p]) < 1e-6
    assert strategy.residual["overall"] < 1e-12 and set(strategy.residual["modules"]) == set(SHAPES)
    assert all(t.dtype == torch.float32 for t in merged.values()) and list(merged) == sorted(merged)


def test_exact_merge_is_the_best_rank_r_approximation_otherwise():
    gen = torch.Generator().manual_seed(2)
    updates = [(lora_state(gen, 4), config(4)) for _ in range(3)]     # sum of rank 12 > 4
    merged, strategy = merge(config(4), [WeightedUpdate(i, 1, s, c) for i, (s, c) in enumerate(updates)],
                             weighting="uniform")
    dense = dense_mean(updates, [1 / 3] * 3)
    squares = {"error": 0.0, "total": 0.0}
    for p, product in products(merged, config(4)).items():
        best, residual = best_rank(dense[p], 4)
        assert rel(product, best) < 1e-6
        assert strategy.residual["modules"][p] == pytest.approx(residual, rel=1e-9) and residual > 0.1
        squares["error"] += float(torch.linalg.norm(dense[p] - best)) ** 2
        squares["total"] += float(torch.linalg.norm(dense[p])) ** 2
    assert strategy.residual["overall"] == pytest.approx(math.sqrt(squares["error"] / squares["total"]), rel=1e-9)


def test_fedavg_error_on_random_updates_and_none_with_a_shared_a():
    gen = torch.Generator().manual_seed(3)
    samples = [2, 3, 5]
    weights = [n / 10 for n in samples]
    random = [(lora_state(gen, 4), config(4)) for _ in range(3)]
    error = aggregation_error(random, samples)
    assert error["fedavg"] > 0.1 and error["exact"] > 0.1 and set(error["modules"]) == set(SHAPES)
    fedavg = FedAvg().aggregate_train(random[0][0], [WeightedUpdate(i, n, s)
                                                    for i, (n, (s, _)) in enumerate(zip(samples, random))])
    dense, got = dense_mean(random, weights), products(fedavg, config(4))
    for p in SHAPES:  # the measure is what FedAvg's merged adapter really misses
        assert error["modules"][p]["fedavg"] == pytest.approx(rel(got[p], dense[p]), rel=1e-5)
    shared_a = torch.randn(4, 10, generator=gen)  # FFA-LoRA: A frozen at the global one, so mean(B) A is exact
    ffa = [(lora_state(gen, 4, a=shared_a), config(4)) for _ in range(3)]
    assert aggregation_error(ffa, weights)["fedavg"] < 1e-12
    assert "fedavg" not in aggregation_error([random[0], (lora_state(gen, 2), config(2))], [1, 1])


def test_heterogeneous_ranks_and_alphas():
    gen = torch.Generator().manual_seed(4)
    global_config = config(4, 8)
    global_state, _ = refactor({p: torch.randn(shape, generator=gen, dtype=torch.float64)
                                for p, shape in SHAPES.items()}, global_config)
    global_products = products(global_state, global_config)
    for client in (config(2, 16), config(3, 3), config(4, 1)):
        start = truncate(global_state, global_config, client)
        assert all(t.shape[0 if ".lora_A." in k else 1] == client["r"] for k, t in start.items())
        for p, product in products(start, client).items():  # the global product's best rank-r_i approximation
            assert rel(product, best_rank(global_products[p], client["r"])[0]) < 1e-6
    same = truncate(global_state, global_config, dict(global_config))
    assert all(same[k] is global_state[k] for k in global_state) and same is not global_state
    updates = [(lora_state(gen, 2), config(2, 16)), (lora_state(gen, 1), config(1, 3))]  # rank 3 <= 4: exact
    merged, _ = merge(global_config, [WeightedUpdate(i, n, s, c) for i, (n, (s, c)) in
                                      enumerate(zip([5, 15], updates))])
    dense = dense_mean(updates, [0.25, 0.75])
    assert all(rel(t, dense[p]) < 1e-6 for p, t in products(merged, global_config).items())
    with pytest.raises(LoraError, match="client LoRA rank 8 exceeds the global rank 4"):
        truncate(global_state, global_config, config(8))
    with pytest.raises(LoraError, match="targets"):
        truncate(global_state, global_config, {**config(2), "target_modules": ["q_proj"]})


def test_refactor_is_deterministic_and_sign_normalised():
    gen = torch.Generator().manual_seed(5)
    dense = {p: torch.randn(shape, generator=gen, dtype=torch.float64) for p, shape in SHAPES.items()}
    first, residual = refactor(dense, config(3))
    again, residual_again = refactor(dense, config(3))
    assert list(first) == list(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert residual == residual_again
    negated, _ = refactor({p: -m for p, m in dense.items()}, config(3))
    for key, a in first.items():
        if ".lora_A." in key:
            lead = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
            assert (lead > 0).all()
            torch.testing.assert_close(negated[key], a)  # -M = (-U) S V^T: same A, negated B
        else:
            torch.testing.assert_close(negated[key], -a)
    rank_one = {p: torch.outer(*(torch.randn(n, generator=gen, dtype=torch.float64) for n in shape))
                for p, shape in SHAPES.items()}
    padded, residual = refactor(rank_one, config(3))
    for p in SHAPES:  # unused components: B = 0, A orthonormal (they train like a fresh LoRA)
        a, b = padded[f"{p}.lora_A.weight"].double(), padded[f"{p}.lora_B.weight"]
        torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
        assert b[:, 1:].abs().max() < 1e-6 and residual["modules"][p] < 1e-12


# total rank 12: at least both modules' size (dense SVD route); 6: below q_proj's size 10 (QR core route) and at
# v_proj's size 6 (dense route) in one call; 4: below both (QR route); 2 < r = 3 (dense, zero directions)
@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 2, 2), (2, 2), (1, 1)])
def test_refactor_of_a_sum_of_terms_equals_refactor_of_the_dense_sum(ranks):
    gen = torch.Generator().manual_seed(8)
    terms = {p: [(torch.randn(r, inn, generator=gen, dtype=torch.float64),
                  torch.randn(out, r, generator=gen, dtype=torch.float64)) for r in ranks]
             for p, (out, inn) in SHAPES.items()}
    dense = {p: sum(b @ a for a, b in pairs) for p, pairs in terms.items()}
    fast, fast_residual = refactor_sum(terms, config(3))
    slow, slow_residual = refactor(dense, config(3))
    assert list(fast) == list(slow)
    for key in slow:  # same sign-normalised factors, not just the same product
        torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=1e-5)
    assert fast_residual["overall"] == pytest.approx(slow_residual["overall"], rel=1e-9, abs=1e-12)
    with pytest.raises(LoraError, match="no rank-8 factors"):
        refactor_sum({"m": [(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen))] * 3}, config(8))


def test_weights_follow_samples_or_uniform():
    gen = torch.Generator().manual_seed(6)
    updates = [(lora_state(gen, 1), config(1)) for _ in range(3)]
    wrapped = [WeightedUpdate(i, n, s, c) for i, (n, (s, c)) in enumerate(zip([1, 2, 7], updates))]
    for weighting, weights in (("num_samples", [0.1, 0.2, 0.7]), ("uniform", [1 / 3] * 3)):
        merged, _ = merge(config(4), wrapped, weighting)
        dense = dense_mean(updates, weights)
        assert all(rel(t, dense[p]) < 1e-6 for p, t in products(merged, config(4)).items())


def test_updates_are_merged_in_submission_order_whatever_order_the_list_has():
    gen = torch.Generator().manual_seed(7)
    updates = [WeightedUpdate(i, n, lora_state(gen, 3), config(3)) for i, n in enumerate([5, 1, 3, 2])]
    ordered, _ = merge(config(4), updates)
    shuffled, _ = merge(config(4), [updates[i] for i in (2, 0, 3, 1)])
    assert all(torch.equal(ordered[k], shuffled[k]) for k in ordered)
    dense = dense_mean([(u.state, config(3)) for u in updates], [5 / 11, 1 / 11, 3 / 11, 2 / 11])
    for p, product in products(ordered, config(4)).items():
        assert rel(product, best_rank(dense[p], 4)[0]) < 1e-6
    total = weighted_mean([torch.tensor([1e17]), torch.tensor([1.0]), torch.tensor([-1e17])], [1.0] * 3)
    assert total.item() == 0.0  # no reordering inside the accumulation either


def test_equivalence_within_the_declared_tolerance_compares_products():
    gen = torch.Generator().manual_seed(8)
    merged, strategy = merge(config(4), [WeightedUpdate(i, 1, lora_state(gen, 4)) for i in range(3)])
    assert strategy.params == {"tolerance": 1e-6}
    flipped = {k: -t if k.endswith(("q_proj.lora_A.weight", "q_proj.lora_B.weight")) else t
               for k, t in merged.items()}
    assert strategy.equivalent(flipped, merged) == (True, 0.0)  # other signs, same products
    for bump, same in ((1e-8, True), (1e-4, False)):  # in float64: a bump below float32's resolution
        ok, error = strategy.equivalent({k: t.double() * (1 + bump) if ".lora_B." in k else t
                                         for k, t in merged.items()}, merged)
        assert ok is same and error == pytest.approx(bump, rel=1e-6)
    assert not LoraExact(adapter_config=config(4), tolerance=1e-3).equivalent(
        {k: t * 1.01 for k, t in merged.items()}, merged)[0]
    missing = {k: t for k, t in merged.items() if "v_proj" not in k}
    assert strategy.equivalent(missing, merged) == (False, math.inf)
    assert strategy.equivalent({"x": torch.zeros(1)}, merged) == (False, math.inf)


def test_strategy_for_passes_the_rules_adapter_config():
    rules = FederationRules(base_model="00" * 32, lora=config(4), aggregation="lora_exact")
    strategy = rules.strategy()
    assert isinstance(strategy, LoraExact) and strategy.adapter_config == rules.lora and strategy.residual is None
    assert FederationRules(base_model="00" * 32, lora=config(4)).strategy().adapter_config == rules.lora
    assert WeightedUpdate(0, 1, {}).adapter_config is None
    for params, needle in (({"adapter_config": config(2)}, "has no parameter 'adapter_config'"),
                           ({"tolerance": 0}, "tolerance must be > 0"),
                           ({"rank": 2}, "no parameter 'rank'; known: tolerance")):
        with pytest.raises(RulesError, match=needle):
            FederationRules(base_model="00" * 32, lora=config(4), aggregation="lora_exact",
                                         params=params).strategy()
    with pytest.raises(RulesError, match="lora_exact needs the global adapter config"):
        LoraExact()


def test_errors_name_the_problem():
    gen = torch.Generator().manual_seed(9)
    good = lora_state(gen, 2)
    prefix = next(iter(SHAPES))
    cases = [({**good, "prompt_embeddings": torch.zeros(4, 10)}, None,
              "update #1: tensor 'prompt_embeddings' is not a LoRA A or B weight"),
             ({k: t for k, t in good.items() if k != f"{prefix}.lora_B.weight"}, None, "has no partner"),
             (good, config(3), "not rank 3 factors"),
             ({k: t for k, t in good.items() if not k.startswith(prefix)}, None, "update #1 adapts other modules")]
    for state, declared, needle in cases:
        with pytest.raises(AggregateError, match=needle) as exc:
            merge(config(2), [WeightedUpdate(0, 1, good), WeightedUpdate(1, 1, state, declared)])
        assert str(exc.value).startswith("lora_exact") and "\n" not in str(exc.value)
    with pytest.raises(AggregateError, match="keeps no server state"):
        LoraExact(server_state={}, adapter_config=config(2)).aggregate_train(good, [WeightedUpdate(0, 1, good)])
    with pytest.raises(AggregateError, match="the merged update: .*no rank-8 factors"):
        LoraExact(adapter_config=config(8)).aggregate_train(lora_state(gen, 8), [WeightedUpdate(0, 1, good, config(2))])
    with pytest.raises(LoraError, match="LoRA settings need exactly"):
        scale({"r": 4})
