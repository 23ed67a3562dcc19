"""Server optimizers (FedAvgM, FedAdam, FedYogi): the paper formulas, bit-identical across processes and CPU
kernels, exact continuation from recorded state, bad rules refused; and through the real aggregator, round 2
continues from the state round 1's global adapter records."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from test_federation import World

from chain.clients import Federation
from chain.wallet import dev_account
from fednode.learning.adapters import LoraTrainer
from fednode.learning.settings import LoraSettings
from fednode.protocol.aggregator import Aggregator
from fednode.protocol.packaging import (
    SERVER_STATE_KEY,
    pack_adapter,
    pack_global,
    unpack_adapter,
)
from fednode.protocol.publish import PublishError, fetch_server_state
from fednode.protocol.rules import FederationRules, RulesError
from fednode.storage import EmbeddedStore
from fednode.storage.cid import cid_of
from fednode.strategies.base import AggregateError, WeightedUpdate
from fednode.strategies.fedavg import FedAvg
from fednode.strategies.fedopt import FedAdam, FedAvgM, FedYogi
from fednode.strategies.registry import build

SHAPES = {"layer.lora_A": (4, 64), "layer.lora_B": (64, 4), "wide.lora_A": (257, 255)}  # 65k: threaded kernels
PARAMS = {"fedavgm": {"server_learning_rate": 0.7, "server_momentum": 0.9},
          "fedadam": {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4},
          "fedyogi": {"eta": 0.02, "beta_1": 0.85, "beta_2": 0.9, "tau": 1e-3}}
STATEFUL = sorted(PARAMS)


def rules_for(aggregation: str, params: dict | None = None, weighting: str = "num_samples") -> FederationRules:
    return FederationRules(base_model="00" * 32, lora=LoraSettings(r=4).to_json(), aggregation=aggregation,
                           params=PARAMS.get(aggregation, {}) if params is None else params, weighting=weighting)


def synthetic_round(seed: int, start: dict | None = None, n: int = 3):
    """A global state and `n` updates near it, listed out of submission order, with unequal sample counts."""
    gen = torch.Generator().manual_seed(seed)
    start = start or {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    updates = [WeightedUpdate(i, 5 + 7 * i, {k: t + 0.01 * torch.randn(t.shape, generator=gen)
                                             for k, t in start.items()}) for i in range(n)]
    return start, updates[::-1]


# reference implementations: the formulas of Hsu et al. and Reddi et al., in float64, one tensor at a time
def ref_delta(x, updates, key, weighting="num_samples"):
    raw = [float(u.num_samples) if weighting == "num_samples" else 1.0 for u in updates]
    return sum(w / sum(raw) * (u.state[key].double() - x) for w, u in zip(raw, updates))


def ref_fedavgm(delta, state, p):
    v = p["server_momentum"] * state["momentum"] + delta
    return p["server_learning_rate"] * v, {"momentum": v}


def ref_fedadam(delta, state, p):
    m = p["beta_1"] * state["m"] + (1 - p["beta_1"]) * delta
    v = p["beta_2"] * state["v"] + (1 - p["beta_2"]) * delta ** 2
    return p["eta"] * m / (v.sqrt() + p["tau"]), {"m": m, "v": v}


def ref_fedyogi(delta, state, p):
    m = p["beta_1"] * state["m"] + (1 - p["beta_1"]) * delta
    v = state["v"] - (1 - p["beta_2"]) * delta ** 2 * torch.sign(state["v"] - delta ** 2)
    return p["eta"] * m / (v.sqrt() + p["tau"]), {"m": m, "v": v}


REFERENCE = {"fedavgm": ref_fedavgm, "fedadam": ref_fedadam, "fedyogi": ref_fedyogi}


def prior_state(cls, start, seed):
    """A float32 state of the kind a previous round leaves: v in [0, 2e-4] straddles delta^2 (Yogi's two signs)."""
    gen = torch.Generator().manual_seed(seed)
    return {f"{slot}.{k}": (torch.rand(t.shape, generator=gen) * 2e-4 if slot == "v"
                            else 0.01 * torch.randn(t.shape, generator=gen)) for k, t in start.items()
            for slot in cls.slots}


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("warm", [False, True], ids=["first_round", "with_state"])
def test_server_optimizer_matches_reference(name, warm):
    start, updates = synthetic_round(1)
    cls = type(rules_for(name).strategy())
    prior = prior_state(cls, start, 2) if warm else None
    strategy = rules_for(name).strategy(prior)
    merged = strategy.aggregate_train(start, updates)
    for key, x32 in start.items():
        x = x32.double()
        slots = {slot: prior[f"{slot}.{key}"].double() if warm else torch.zeros_like(x) for slot in cls.slots}
        increment, new = REFERENCE[name](ref_delta(x, updates, key), slots, PARAMS[name])
        # the optimizer step itself, in float64, to 1e-12
        ours, ours_slots = strategy.step(ref_delta(x, updates, key), *slots.values())
        torch.testing.assert_close(ours, increment, rtol=1e-12, atol=1e-15)
        for got, want in zip(ours_slots, new.values()):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        # end to end: the float32 global and state are the reference rounded once (within one float32 ulp)
        torch.testing.assert_close(merged[key], (x + increment).float(), rtol=2 ** -23, atol=1e-30)
        for slot, want in new.items():
            torch.testing.assert_close(strategy.server_state[f"{slot}.{key}"], want.float(), rtol=2 ** -23,
                                       atol=1e-30)
    assert all(t.dtype == torch.float32 for t in [*merged.values(), *strategy.server_state.values()])
    assert not torch.equal(merged["layer.lora_A"], FedAvg().aggregate_train(start, updates)["layer.lora_A"])


@pytest.mark.parametrize("weighting", ["num_samples", "uniform"])
def test_fedavg_is_the_weighted_mean_written_out_by_hand(weighting):
    """FedAvg against its formula, sum_i n_i x_i / sum_i n_i, evaluated element by element in Python floats (float64):
    the result is that mean rounded once to float32."""
    start, updates = synthetic_round(4)
    merged = FedAvg(weighting).aggregate_train(start, updates)
    n = [u.num_samples if weighting == "num_samples" else 1 for u in updates]
    for key in start:
        columns = zip(*(u.state[key].double().flatten().tolist() for u in updates))
        by_hand = [sum(w * x for w, x in zip(n, column)) / sum(n) for column in columns]
        got = merged[key].double().flatten().tolist()
        assert merged[key].dtype == torch.float32 and len(got) == len(by_hand)
        assert all(abs(g - h) <= 2.0 ** -24 * abs(h) + 1e-300 for g, h in zip(got, by_hand)), key


@pytest.mark.parametrize("weighting", ["num_samples", "uniform"])
def test_fedavgm_without_momentum_at_unit_rate_is_fedavg(weighting):
    start, updates = synthetic_round(3)
    momentum = rules_for("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.0},
                                      weighting).strategy()
    fedavg = FedAvg(weighting)
    for _ in range(2):  # the second round runs with the recorded (zero-momentum) state
        merged = momentum.aggregate_train(start, updates)
        expected = fedavg.aggregate_train(start, updates)
        assert all(torch.equal(merged[k], expected[k]) for k in expected)
        start, updates = synthetic_round(4, merged)


def _packed_round(strategy, start, updates) -> tuple[bytes, bytes]:
    merged = strategy.aggregate_train(start, updates)
    return pack_adapter(merged, {}), pack_adapter(strategy.server_state, {}) if strategy.server_state else b""


@pytest.mark.parametrize("name", STATEFUL)
def test_three_rounds_in_one_object_equal_three_restarts_from_recorded_state(name):
    rules = rules_for(name)
    uninterrupted = rules.strategy()
    recorded = None                     # what a restarted aggregator fetches: the packed state bytes
    start = None
    for round_id in range(1, 4):
        start, updates = synthetic_round(10 + round_id, start)
        merged_bytes, state_bytes = _packed_round(uninterrupted, start, updates)
        restored = None if recorded is None else unpack_adapter(recorded, 1 << 30)[0]
        restarted = rules.strategy(restored)
        assert _packed_round(restarted, start, updates) == (merged_bytes, state_bytes)
        if round_id == 3:  # the carried state matters: starting over from zeros gives another global adapter
            assert _packed_round(rules.strategy(), start, updates)[0] != merged_bytes
        recorded = state_bytes
        start = unpack_adapter(merged_bytes, 1 << 30)[0]


SUBPROCESS = r"""
import sys
from pathlib import Path
import torch
from safetensors.torch import load, save
from fednode.strategies.base import WeightedUpdate
from fednode.protocol.rules import FederationRules
torch.set_num_threads(1)
d = Path(sys.argv[1])
for case in sorted(p.name for p in d.iterdir() if p.is_dir()):
    c = d / case
    rules = FederationRules.from_bytes((c / "rules.json").read_bytes())
    state = load((c / "state.st").read_bytes()) if (c / "state.st").exists() else None
    ups = [WeightedUpdate(int(p.stem.split("_")[1]), int(p.stem.split("_")[2]), load(p.read_bytes()))
           for p in sorted(c.glob("update_*.st"))]
    strategy = rules.strategy(state)
    (c / "merged.out").write_bytes(save(strategy.aggregate_train(load((c / "start.st").read_bytes()), ups)))
    if strategy.server_state is not None:
        (c / "state.out").write_bytes(save(strategy.server_state))
"""


def test_bit_identical_in_another_process_with_scalar_kernels(tmp_path):
    """The same inputs in a fresh single-threaded process whose ATen runs its non-vectorized kernels (as on a
    CPU without AVX2) give the same bits as here: no result depends on threads, SIMD width or process."""
    expected = {}
    robust = {"median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"f": 1}, "multi_krum": {"f": 1, "m": 3}}
    cases = {name: rules_for(name) for name in ["fedavg", *STATEFUL]}
    cases |= {name: rules_for(name, params) for name, params in robust.items()}
    cases["server_clip"] = replace(rules_for("fedadam"), server_clip=1.0, max_weight_share=0.3)
    for name, rules in cases.items():
        n = 5 if name in robust or name == "server_clip" else 3
        start, updates = synthetic_round(20, n=n)
        warm = rules.strategy()
        warm.aggregate_train(start, updates)           # a round earlier, so the state is not all zeros
        start, updates = synthetic_round(21, start, n=n)
        case = tmp_path / name
        case.mkdir()
        (case / "rules.json").write_bytes(rules.to_bytes())
        (case / "start.st").write_bytes(pack_adapter(start, {}))
        if warm.server_state is not None:
            (case / "state.st").write_bytes(pack_adapter(warm.server_state, {}))
        for u in updates:
            (case / f"update_{u.index}_{u.num_samples}.st").write_bytes(pack_adapter(u.state, {}))
        expected[name] = _packed_round(rules.strategy(warm.server_state), start, updates)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path)], check=True, env=env, timeout=300)
    for name, (merged_bytes, state_bytes) in expected.items():
        case = tmp_path / name
        assert pack_adapter(load_safetensors((case / "merged.out").read_bytes()), {}) == merged_bytes, name
        state_out = case / "state.out"
        assert (pack_adapter(load_safetensors(state_out.read_bytes()), {}) if state_out.exists() else b"") \
            == state_bytes, name


@pytest.mark.parametrize("aggregation, params, problem", [
    ("fedprox", {}, "unknown aggregation rule 'fedprox'"),
    ("fedadam", [["eta", 0.1]], "aggregation params must be a JSON object"),
    ("fedavg", {"eta": 0.1}, "fedavg has no parameter 'eta'"),
    ("fedadam", {"lr": 0.1}, "fedadam has no parameter 'lr'"),
    ("fedadam", {"weighting": "uniform"}, "fedadam has no parameter 'weighting'"),
    ("fedadam", {"eta": -0.1}, "eta must be > 0"),
    ("fedyogi", {"beta_2": 1.0}, "beta_2 must be in [0, 1)"),
    ("fedyogi", {"tau": float("nan")}, "tau must be a finite number"),
    ("fedavgm", {"server_momentum": True}, "server_momentum must be a finite number"),
    ("fedavgm", {"server_learning_rate": "1"}, "server_learning_rate must be a finite number"),
])
def test_unknown_rule_or_bad_parameter_is_refused_in_one_line(aggregation, params, problem):
    with pytest.raises(RulesError, match=re.escape(problem)) as info:
        build(aggregation, params, "num_samples", LoraSettings(r=4).to_json())
    assert "\n" not in str(info.value)
    with pytest.raises(RulesError, match=re.escape(problem)):  # such rules are never built: no round opens
        rules_for(aggregation, params)


def test_state_that_does_not_fit_the_adapter_is_refused():
    start, updates = synthetic_round(5)
    state = prior_state(FedAdam, start, 6)
    del state["v.layer.lora_B"]
    with pytest.raises(AggregateError, match="'v.layer.lora_B' is missing"):
        FedAdam(server_state=state).aggregate_train(start, updates)
    with pytest.raises(AggregateError, match="fedavg keeps no server state"):
        FedAvg(server_state=prior_state(FedAvgM, start, 6)).aggregate_train(start, updates)
    with pytest.raises(AggregateError, match="no accepted updates"):
        FedYogi().aggregate_train(start, [])


def test_recorded_state_is_fetched_verified_and_only_for_its_own_rule(tmp_path):
    store = EmbeddedStore(tmp_path / "store")
    start, updates = synthetic_round(7)
    rules = rules_for("fedadam")
    strategy = rules.strategy()
    merged = strategy.aggregate_train(start, updates)
    data, state_data = pack_global("fid", 1, "0xagg", rules, merged, strategy.server_state)
    store.put(state_data)
    meta = unpack_adapter(data, 1 << 30)[1]
    assert meta[SERVER_STATE_KEY] == cid_of(state_data) and meta["fedchain.kind"] == "global"
    fetched = fetch_server_state(store, meta, rules)
    assert pack_adapter(fetched, {}) == pack_adapter(strategy.server_state, {})
    assert fetch_server_state(store, meta, rules_for("fedyogi")) is None       # FedYogi starts from zeros
    assert fetch_server_state(store, {"fedchain.kind": "global"}, rules) is None  # round 1: no state
    # a stateless rule records nothing: the global adapter is exactly the pre-existing FedAvg file
    plain, none = pack_global("fid", 1, "0xagg", rules_for("fedavg"), merged)
    assert none is None and SERVER_STATE_KEY not in unpack_adapter(plain, 1 << 30)[1]
    path = store.path_of(cid_of(state_data))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(PublishError, match="bytes do not match the CID"):
        fetch_server_state(store, meta, rules)


@pytest.fixture(scope="module")
def trainer(icd_base):
    return LoraTrainer(icd_base, LoraSettings())


def test_aggregator_continues_fedadam_from_the_state_round_one_recorded(tmp_path, icd_base, trainer):
    world = World(tmp_path, icd_base, trainer, n_honest=2)
    rules = replace(world.rules, aggregation="fedadam", params={"eta": 0.01})
    fed = world.aggregator.fed
    agg = Aggregator(fed, world.store, rules, log=world.log.append)

    def accepted(result):
        assert len(result.accepted) == 2
        return [WeightedUpdate(v.submission.index, v.submission.num_samples, v.state) for v in result.accepted]

    def run_round(aggregator, base_digest, base_sha):
        rec = aggregator.open_round(base_digest, base_sha, 3600, min_updates=2)
        for node in world.honest:
            node.participate(rec)
        return aggregator.finalize(rec)

    uninterrupted = rules.strategy()  # one optimizer kept in memory across both rounds
    first = run_round(agg, world.cid_digest, world.sha)
    expected = uninterrupted.aggregate_train(world.initial, accepted(first))
    assert all(torch.equal(first.state[k], expected[k]) for k in expected)
    meta = unpack_adapter(world.store.get(first.cid), 1 << 30)[1]
    recorded = fetch_server_state(world.store, meta, rules)
    assert pack_adapter(recorded, {}) == pack_adapter(uninterrupted.server_state, {})

    restarted = Aggregator(Federation(world.w3, world.deployment, dev_account(world.w3, 9)), world.store, rules,
                           log=world.log.append)
    second = run_round(restarted, first.cid_digest, first.file_sha256)
    merged = uninterrupted.aggregate_train(first.state, accepted(second))
    data, state_data = pack_global(world.fid, second.round_id, fed.address, rules, merged,
                                   uninterrupted.server_state)
    assert hashlib.sha256(data).digest() == second.file_sha256 and world.store.get(second.cid) == data
    assert world.store.get(cid_of(state_data)) == state_data
    # starting round 2 from zeros instead of the recorded state would have given another adapter
    fresh = rules.strategy().aggregate_train(first.state, accepted(second))
    assert not all(torch.equal(fresh[k], merged[k]) for k in merged)
