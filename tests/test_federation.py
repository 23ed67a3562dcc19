"""Node + aggregator on the embedded chain and store: honest rounds, every rejection path, determinism."""
from __future__ import annotations

import hashlib
import io
import itertools
import subprocess
import sys

import pytest
import torch
from support import metrics_for

from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.packaging import adapter_metadata, pack_adapter, unpack_adapter
from fednode.protocol.publish import publish_bytes, publish_json
from fednode.protocol.rules import FederationRules
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore
from fednode.strategies.base import WeightedUpdate
from fednode.strategies.fedavg import FedAvg

LORA = LoraSettings()
TRAIN = TrainSettings(steps=4, batch_size=4)


@pytest.fixture(scope="module")
def trainer(icd_base):
    return LoraTrainer(icd_base, LORA)


class World:
    """An embedded federation with honest hospitals and room for attackers."""

    def __init__(self, tmp_path, icd_base, trainer, n_honest=3, n_attackers=0, max_bytes=1 << 20):
        self.store = EmbeddedStore(tmp_path / "store")
        self.rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), max_adapter_bytes=max_bytes)
        self.log: list[str] = []
        clients = build_clients(DataConfig(num_clients=n_honest + n_attackers, train_per_client=16,
                                           eval_per_client=8))
        self.fed = EmbeddedFederation.create([trainer] * len(clients), clients, self.rules, TRAIN, self.store,
                                             first_account=100, log=self.log.append)
        self.w3, self.deployment, self.fid = self.fed.w3, self.fed.deployment, self.fed.federation_id
        self.admin_fed, self.aggregator, self.nodes = self.fed.admin, self.fed.aggregator, self.fed.nodes
        self.honest, self.attackers = self.nodes[:n_honest], self.nodes[n_honest:]
        self.initial = trainer.initial_state(0)
        self.fed.start(self.initial)
        self.cid_digest, self.sha = self.fed.base

    def open(self, min_updates=1):
        return self.fed.open(min_updates)


def test_honest_round_merges_every_update_and_restart_does_not_resubmit(tmp_path, icd_base, trainer):
    world = World(tmp_path, icd_base, trainer)
    rec = world.open(min_updates=3)
    submitted = [n.participate(rec) for n in world.honest]
    assert all(s is not None for s in submitted)
    assert world.honest[0].participate(rec) is None  # a restarted node sees its own submission on-chain
    result = world.aggregator.finalize(rec)
    assert [v.reason for v in result.verdicts] == [Reason.ACCEPTED] * 3
    expected = FedAvg().aggregate_train(world.initial, [
        WeightedUpdate(i, s.num_samples, unpack_adapter(world.store.get(s.cid), 1 << 20)[0])
        for i, s in enumerate(submitted)])
    assert all(torch.equal(expected[k], result.state[k]) for k in expected)
    info = world.aggregator.fed.round(rec.round_id)
    assert (info.accepted, info.submissions) == (3, 3)
    # the next round starts from the finalized adapter, which every node can fetch and verify
    history = world.aggregator.ledger.refresh()
    assert history.rounds[rec.round_id].finalized.cid_digest == result.cid_digest


def _honest_bytes(world, node, rec, round_id=None, base_model=None, state=None):
    state = state if state is not None else node.trainer.train(node.client.train, TRAIN, world.initial,
                                                               progress=False)[0]
    meta = adapter_metadata(world.fid, rec.round_id if round_id is None else round_id, node.address,
                            base_model or world.rules.base_model, world.rules.lora, "update")
    return state, pack_adapter(state, meta)


def test_every_rejection_path_is_named_and_the_round_still_finalizes(tmp_path, icd_base, trainer):
    attacks = ["tampered_bytes", "sha_mismatch", "cid_mismatch", "revoked", "wrong_round", "nan", "wrong_shape",
               "pickle", "oversized", "norm", "wrong_base", "copied"]
    world = World(tmp_path, icd_base, trainer, n_attackers=len(attacks), max_bytes=1 << 20)
    rec = world.open(min_updates=3)
    honest = [n.participate(rec) for n in world.honest]
    expected = {}
    for attack, node in zip(attacks, world.attackers):
        n = len(node.client.train)  # what its model card declared
        state, data = _honest_bytes(world, node, rec)
        sha = cid_digest = None
        if attack == "tampered_bytes":
            sub = node.publish_and_submit(rec.round_id, data, n, metrics_for(node, rec.round_id, n))
            path = world.store.path_of(sub.cid)
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0xFF
            path.write_bytes(bytes(raw))
            expected[node.address] = Reason.SHA256_MISMATCH
            continue
        if attack == "sha_mismatch":
            _, cid_digest, _ = publish_bytes(world.store, data)
            sha = hashlib.sha256(b"something else").digest()
            expected[node.address] = Reason.SHA256_MISMATCH
        elif attack == "cid_mismatch":
            # the right bytes under a CID computed with other add settings (a dag-pb node over the same bytes)
            sha = hashlib.sha256(data).digest()
            cid_digest = hashlib.sha256(b"other chunking" + data).digest()
            from fednode.storage.cid import cid_from_digest
            path = world.store.path_of(cid_from_digest(cid_digest, "dag-pb"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            expected[node.address] = Reason.CID_MISMATCH
        elif attack == "revoked":
            node.publish_and_submit(rec.round_id, data, n, metrics_for(node, rec.round_id, n))
            world.admin_fed.revoke(node.address, 1)
            expected[node.address] = Reason.REVOKED
            continue
        elif attack == "wrong_round":
            _, data = _honest_bytes(world, node, rec, round_id=rec.round_id + 7, state=state)
            expected[node.address] = Reason.WRONG_ROUND
        elif attack == "nan":
            bad = dict(state)
            key = sorted(bad)[0]
            bad[key] = bad[key].clone()
            bad[key].view(-1)[0] = float("nan")
            _, data = _honest_bytes(world, node, rec, state=bad)
            expected[node.address] = Reason.NON_FINITE
        elif attack == "wrong_shape":
            bad = dict(state)
            key = sorted(bad)[0]
            bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 1)
            _, data = _honest_bytes(world, node, rec, state=bad)
            expected[node.address] = Reason.SHAPE_MISMATCH
        elif attack == "pickle":
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            expected[node.address] = Reason.NOT_SAFETENSORS
        elif attack == "oversized":
            big = dict(state, **{"padding": torch.zeros(300_000)})
            _, data = _honest_bytes(world, node, rec, state=big)
            expected[node.address] = Reason.TOO_LARGE
        elif attack == "norm":
            _, data = _honest_bytes(world, node, rec, state={k: v * 1e4 for k, v in state.items()})
            expected[node.address] = Reason.NORM_TOO_LARGE
        elif attack == "wrong_base":
            _, data = _honest_bytes(world, node, rec, base_model="ab" * 32, state=state)
            expected[node.address] = Reason.WRONG_BASE_MODEL
        elif attack == "copied":
            data = world.store.get(honest[0].cid)
            expected[node.address] = Reason.WRONG_NODE
        if sha is None:
            _, cid_digest, sha = publish_bytes(world.store, data)
        _, metrics_digest = publish_json(world.store, metrics_for(node, rec.round_id, n))
        node.fed.submit_update(rec.round_id, cid_digest, sha, n, metrics_digest)

    result = world.aggregator.finalize(rec)
    got = {v.submission.node: v.reason for v in result.verdicts}
    for node in world.honest:
        assert got[node.address] == Reason.ACCEPTED
    for attack, node in zip(attacks, world.attackers):
        assert got[node.address] == expected[node.address], attack
    assert len(result.accepted) == 3
    finalized = world.aggregator.ledger.refresh().rounds[rec.round_id].finalized
    assert list(finalized.verdicts) == [int(v.reason) for v in result.verdicts]
    assert finalized.accepted == 3
    rejected_lines = [line for line in world.log if "REJECTED" in line]
    assert len(rejected_lines) == len(attacks)
    assert all("\n" not in line for line in rejected_lines)


def test_aggregation_is_bit_identical_in_another_process(tmp_path):
    gen = torch.Generator().manual_seed(3)
    start = {f"layer{i}.lora_A.weight": torch.randn(8, 64, generator=gen) for i in range(4)}
    updates = [WeightedUpdate(i, n, {k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in start.items()})
               for i, n in enumerate([17, 256, 3])]
    merged = FedAvg().aggregate_train(start, list(reversed(updates)))  # order given does not matter
    digest = hashlib.sha256(pack_adapter(merged, {"k": "v"})).hexdigest()
    (tmp_path / "in.safetensors").write_bytes(pack_adapter(start, {}))
    for u in updates:
        (tmp_path / f"u{u.index}.safetensors").write_bytes(pack_adapter(u.state, {}))
    code = f"""
import hashlib, pathlib
from fednode.protocol.packaging import pack_adapter, unpack_adapter
from fednode.strategies.base import WeightedUpdate
from fednode.strategies.fedavg import FedAvg
d = pathlib.Path({str(tmp_path)!r})
load = lambda p: unpack_adapter(p.read_bytes(), 1 << 30)[0]
ups = [WeightedUpdate(i, n, load(d / f"u{{i}}.safetensors")) for i, n in enumerate([17, 256, 3])]
print(hashlib.sha256(pack_adapter(FedAvg().aggregate_train(load(d / "in.safetensors"), ups), {{"k": "v"}})).hexdigest())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == digest
    # and it is a weighted mean: uniform weighting differs
    uniform = FedAvg(weighting="uniform").aggregate_train(start, updates)
    assert not torch.equal(uniform[sorted(start)[0]], merged[sorted(start)[0]])


@pytest.mark.parametrize("merge_order", ["sha256", "submission"])
def test_the_same_updates_in_any_arrival_order_give_one_global_adapter(tmp_path, icd_base, trainer, merge_order):
    """Three hospitals submit the same updates in each of the six possible orders, each time to a fresh embedded
    federation (same contract address, wallets and round, so the same update bytes)."""
    rules = FederationRules(base_model=icd_base.digest, lora=LORA.to_json(), merge_order=merge_order)
    clients = build_clients(DataConfig(num_clients=3, train_per_client=16, eval_per_client=8))
    globals_, updates = set(), set()
    for i, order in enumerate(itertools.permutations(range(3))):
        fed = EmbeddedFederation.create([trainer] * 3, clients, rules, TRAIN, EmbeddedStore(tmp_path / str(i)))
        fed.start(trainer.initial_state(0))
        run = fed.run_round([fed.nodes[j] for j in order])
        assert [v.submission.node for v in run.result.verdicts] == [fed.nodes[j].address for j in order]
        updates.add(frozenset(u.file_sha256 for u in run.updates))
        globals_.add(run.result.file_sha256)
    assert len(updates) == 1  # the same three update files every time
    if merge_order == "sha256":
        assert len(globals_) == 1
    else:  # summed in arrival order, float64 rounding makes some orders differ in their last bits
        assert len(globals_) > 1
