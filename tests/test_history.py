"""Histories written by an earlier fedchain still verify: today's audit, on a fresh anvil loaded with the recorded
chain state and the recorded store, recomputes every global adapter bit for bit (tests/data/history-v1)."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from chain.connection import connect
from chain.deployment import Deployment
from devstack import anvil
from fednode.audit import Status, run_audit
from fednode.storage import EmbeddedStore
from support import free_port, require

RECORDED = Path(__file__).resolve().parent / "data" / "history-v1"


@pytest.fixture(scope="module")
def recorded_chain(tmp_path_factory):
    require(anvil.anvil_binary, anvil.AnvilError, "anvil")
    state_dir = tmp_path_factory.mktemp("history-anvil")
    (state_dir / "anvil-state.json").write_bytes(gzip.decompress((RECORDED / "anvil-state.json.gz").read_bytes()))
    store = tmp_path_factory.mktemp("history-store")
    shutil.copytree(RECORDED / "store", store, dirs_exist_ok=True)
    handle = anvil.start(state_dir, port=free_port())
    yield connect(handle.url), EmbeddedStore(store)
    anvil.stop(state_dir)


@pytest.mark.anvil
@pytest.mark.parametrize("aggregation", ["fedavg", "fedadam"])
def test_a_history_recorded_before_the_restructuring_verifies(recorded_chain, aggregation):
    w3, store = recorded_chain
    deployment = Deployment.load(RECORDED / f"deployment-{aggregation}.json")
    report = run_audit(w3, deployment, store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED] * 2, report.table()
    assert [r.rules["aggregation"] for r in report.rounds] == [aggregation] * 2
    assert all(r.result.recomputed_sha256 == r.result.file_sha256 for r in report.rounds)
