"""The real stack: anvil + IPFS node started by `fedchain stack up`, every participant its own OS process with
its own keystore, coordinating only through the chain and IPFS. Checked from outside the processes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port
from web3 import Web3

from chain.clients import Federation
from chain.connection import connect
from chain.deployment import Deployment
from fednode.learning.data import DataConfig, corpus_texts
from fednode.learning.models import load_base_model
from fednode.protocol.ledger import Ledger
from fednode.protocol.publish import locate
from fednode.storage import IpfsHttpStore

ROOT = Path(__file__).resolve().parent.parent
FEDCHAIN = [sys.executable, "-m", "fednode"]
PASSWORD = "correct horse battery staple"
# the default data config but for fewer training examples: same corpus, so the session's cached tiny base is reused
DATA = dict(source="icd10", partition="natural", num_clients=3, train_per_client=32, eval_per_client=64, seed=0)
pytestmark = pytest.mark.stack


def run(args, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(FEDCHAIN + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedchain {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def write_config(path: Path, rpc: str, ipfs: str, keystore: str, client: int = 0, steps: int = 5, **fed) -> Path:
    federation = {"rounds": 2, "round_seconds": 600, "min_updates": 3, "poll_seconds": 0.3, **fed}
    text = f"""
[chain]
rpc = "{rpc}"
deployment = "deployment.json"

[storage]
ipfs = "{ipfs}"
timeout = 20.0

[wallet]
keystore = "{keystore}"

[data]
{chr(10).join(f'{k} = {json.dumps(v)}' for k, v in DATA.items())}
client = {client}

[train]
steps = {steps}
batch_size = 4

[federation]
{chr(10).join(f'{k} = {json.dumps(v)}' for k, v in federation.items())}
"""
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_cache, icd_base):
    work = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "FEDCHAIN_PASSWORD": PASSWORD, "FEDCHAIN_CACHE": str(model_cache),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # every process loads the same tiny base, built once per session (icd_base) into model_cache
    assert icd_base.digest == load_base_model(
        "tiny", model_cache, corpus=lambda: corpus_texts(DataConfig(**DATA), 4000), seed=0).digest
    started = time.perf_counter()
    up = run(["stack", "up", "--dir", str(work / ".stack"), "--anvil-port", str(free_port()),
              "--ipfs-port", str(free_port())], env)
    record = json.loads((work / ".stack" / "stack.json").read_text())
    record["wall_startup"] = time.perf_counter() - started
    yield work, env, record, up.stdout
    run(["stack", "down", "--dir", str(work / ".stack")], env, check=False)


def test_three_node_processes_two_rounds_with_a_node_killed_mid_round(stack):
    work, env, record, up_out = stack
    rpc, ipfs = record["rpc"], record["ipfs_api"]
    assert "stack up" in up_out
    assert run(["stack", "status", "--dir", str(work / ".stack")], env).stdout.split() == ["anvil", "up", "ipfs", "up"]

    # wallets: an admin, an aggregator and three hospitals, each its own encrypted keystore, funded locally
    addresses = {}
    for name in ("admin", "aggregator", "node0", "node1", "node2"):
        out = run(["wallet", "new", "--out", str(work / f"{name}.json")], env).stdout
        addresses[name] = out.split()[0]
        run(["wallet", "fund", "--rpc", rpc, "--to", addresses[name], "--ether", "5"], env)
    run(["chain", "deploy", "--rpc", rpc, "--keystore", str(work / "admin.json"), "--aggregator",
         addresses["aggregator"], "--out", str(work / "deployment.json")], env)

    admin_cfg = write_config(work / "admin.toml", rpc, ipfs, "admin.json")
    agg_cfg = write_config(work / "aggregator.toml", rpc, ipfs, "aggregator.json")
    node_cfgs = [write_config(work / f"node{i}.toml", rpc, ipfs, f"node{i}.json", client=i,
                              steps=400 if i == 1 else 5) for i in range(3)]
    for i, cfg in enumerate(node_cfgs):
        assert "joined as hospital-" in run(["node", "join", "--config", str(cfg)], env).stdout
        run(["admin", "approve", "--config", str(admin_cfg), addresses[f"node{i}"]], env)
    listing = run(["admin", "participants", "--config", str(admin_cfg)], env).stdout
    assert listing.count("approved") == 3

    logs = {}

    def spawn(name, args):
        logs[name] = open(work / f"{name}.log", "a")
        return subprocess.Popen(FEDCHAIN + args, stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    procs = {"aggregator": spawn("aggregator", ["aggregator", "run", "--config", str(agg_cfg)])}
    for i, cfg in enumerate(node_cfgs):
        procs[f"node{i}"] = spawn(f"node{i}", ["node", "run", "--config", str(cfg)])

    # kill node1 while it trains its round-1 update (it has many more steps than the others), then restart it
    deadline = time.monotonic() + 240
    while "round 1: training" not in (work / "node1.log").read_text():
        assert time.monotonic() < deadline, (work / "node1.log").read_text()
        assert procs["node1"].poll() is None, (work / "node1.log").read_text()
        time.sleep(0.2)
    time.sleep(1.0)
    procs["node1"].send_signal(signal.SIGKILL)
    procs["node1"].wait()
    killed_log = (work / "node1.log").read_text()
    assert "submitted" not in killed_log
    procs["node1"] = spawn("node1", ["node", "run", "--config", str(node_cfgs[1])])

    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline + 300 - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} did not finish:\n" + (work / f"{name}.log").read_text()[-3000:])
        assert proc.returncode == 0, (work / f"{name}.log").read_text()[-3000:]
    for fh in logs.values():
        fh.close()

    # from outside every process: the events on anvil
    w3 = connect(rpc)
    deployment = Deployment.load(work / "deployment.json")
    history = Ledger(Federation(w3, deployment)).refresh()
    names = [e.name for e in history.events]
    assert names.count("Joined") == 3 and names.count("Approved") == 3
    assert names.count("RoundOpened") == 2 and names.count("RoundFinalized") == 2
    assert names.count("UpdateSubmitted") == 6
    per_node = {}
    for rnd in history.rounds.values():
        for sub in rnd.submissions:
            per_node.setdefault((rnd.round_id, sub.node), 0)
            per_node[(rnd.round_id, sub.node)] += 1
        assert list(rnd.finalized.verdicts) == [0, 0, 0]
    assert sorted(set(n for _, n in per_node)) == sorted(Web3.to_checksum_address(addresses[f"node{i}"])
                                                          for i in range(3))
    assert set(per_node.values()) == {1}, "an update was submitted twice"
    node1_log = (work / "node1.log").read_text()
    assert "AlreadySubmitted" not in node1_log and node1_log.count("round 1: submitted") == 1

    # every recorded CID resolves on the IPFS node to bytes whose sha256 is the on-chain digest
    store = IpfsHttpStore(ipfs, timeout_s=20)
    digests = []
    for rnd in history.rounds.values():
        digests.append((rnd.base_cid_digest, rnd.base_sha256))
        digests += [(s.cid_digest, s.file_sha256) for s in rnd.submissions]
        digests.append((rnd.finalized.cid_digest, rnd.finalized.file_sha256))
    for cid_digest, sha in digests:
        data = store.get(locate(store, cid_digest, sha))
        assert hashlib.sha256(data).digest() == sha
    # round 2 starts from round 1's result
    assert history.rounds[2].base_cid_digest == history.rounds[1].finalized.cid_digest
    for name in ("node0", "node2"):
        assert "federation complete" in (work / f"{name}.log").read_text()
    # an outside auditor re-derives the whole history, bit for bit, from anvil and the IPFS node alone
    audit = run(["audit", "--rpc", rpc, "--deployment", str(work / "deployment.json"), "--ipfs", ipfs, "--verify"],
                env)
    assert audit.stdout.strip().endswith("audit: 2 rounds VERIFIED")
