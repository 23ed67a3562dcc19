"""The real stack: anvil + IPFS node started by `fedchain stack up`, every participant its own OS process with
its own keystore, coordinating only through the chain and IPFS. Checked from outside the processes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port, free_ports
from web3 import Web3

from chain.clients import Federation
from chain.connection import connect
from chain.deployment import Deployment
from devstack import anvil as anvil_daemon
from devstack import ipfs as ipfs_daemon
from devstack.daemon import post_json
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
# what a user runs on an exported adapter: the README's snippet, with the folder as argv[1]
README_LOAD = """
import sys
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("ICD-10-CM code E11.9 means:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.3)
print(tokenizer.decode(out[0], skip_special_tokens=True))
"""


def run(args, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(FEDCHAIN + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedchain {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def finish(procs: dict[str, subprocess.Popen], logs: dict[str, Path], deadline: float) -> None:
    """Wait for every process until `deadline` (time.monotonic()); one that does not finish in time kills them
    all and fails the test with its log, one that exits nonzero fails it with its log."""
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} did not finish:\n" + logs[name].read_text()[-3000:])
        assert proc.returncode == 0, logs[name].read_text()[-3000:]


def toml_value(value) -> str:
    """A TOML value: JSON for scalars, an inline table for a dict."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def write_config(path: Path, rpc: str, ipfs: str, keystore: str, client: int = 0, steps: int = 5, extra: str = "",
                 **fed) -> Path:
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
{chr(10).join(f'{k} = {toml_value(v)}' for k, v in federation.items())}
{extra}
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


def test_three_node_processes_two_masked_rounds_with_a_node_killed_mid_round(stack):
    """Securely aggregated rounds: node0 and node1 submit directly (node1 is killed while it trains and
    restarted); node2 signs its masked updates and hands them to the aggregator's relay endpoint, sending no
    transaction after its join but its share reveals."""
    work, env, record, up_out = stack
    rpc, ipfs = record["rpc"], record["ipfs_api"]
    assert "stack up" in up_out
    assert run(["stack", "status", "--dir", str(work / ".stack")], env).stdout.split() == ["anvil", "up", rpc, "ipfs",
                                                                                       "up", ipfs]

    # wallets: an admin, an aggregator and three hospitals, each its own encrypted keystore, funded locally
    addresses = {}
    for name in ("admin", "aggregator", "node0", "node1", "node2"):
        out = run(["wallet", "new", "--out", str(work / f"{name}.json")], env).stdout
        addresses[name] = out.split()[0]
        run(["wallet", "fund", "--rpc", rpc, "--to", addresses[name], "--ether", "5"], env)
    run(["chain", "deploy", "--rpc", rpc, "--keystore", str(work / "admin.json"), "--aggregator",
         addresses["aggregator"], "--out", str(work / "deployment.json")], env)

    # securely aggregated: the aggregator sees only the sum of the three masked updates
    secure = {"secure_aggregation": {"threshold": 0.6, "clip": 1.0, "scale_bits": 20}}
    admin_cfg = write_config(work / "admin.toml", rpc, ipfs, "admin.json", **secure)
    relay = f"127.0.0.1:{free_port()}"
    agg_cfg = write_config(work / "aggregator.toml", rpc, ipfs, "aggregator.json",
                           extra=f'[aggregator]\nrelay_listen = "{relay}"', **secure)
    relay_path = f'[node]\nsubmit = "relay"\nrelay = "http://{relay}"'
    node_cfgs = [write_config(work / f"node{i}.toml", rpc, ipfs, f"node{i}.json", client=i,
                              steps=400 if i == 1 else 5, extra=relay_path if i == 2 else "", **secure)
                 for i in range(3)]
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

    finish(procs, {name: work / f"{name}.log" for name in procs}, deadline + 300)
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
    # each round fixed its survivors, then at least t = 2 of the 3 hospitals revealed their shares
    assert names.count("UnmaskRequested") == 2 and names.count("SharesRevealed") >= 4
    assert all(len(r.reveals) >= 2 for r in history.rounds.values())
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
    # node2's updates came in the aggregator's batches: it sent its join and its share reveals, nothing else
    node2 = Web3.to_checksum_address(addresses["node2"])
    reveals = sum(r.node == node2 for rnd in history.rounds.values() for r in rnd.reveals)
    assert w3.eth.get_transaction_count(node2) == 1 + reveals
    assert (work / "node2.log").read_text().count("handed it to the relay") == 2
    assert (work / "aggregator.log").read_text().count("signed updates recorded") == 2
    relayed = [s for rnd in history.rounds.values() for s in rnd.submissions if s.node == node2]
    assert [w3.eth.get_transaction(s.tx_hash)["from"] for s in relayed] == \
        [Web3.to_checksum_address(addresses["aggregator"])] * 2

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

    # the federation's status without a wallet: the last round finalized, every hospital submitted to it
    status = json.loads(run(["status", "--config", str(node_cfgs[0]), "--json"], {**env, "FEDCHAIN_PASSWORD": ""})
                        .stdout)
    assert status["last_finalized"]["round"] == 2 and status["current"]["state"] == "FINALIZED"
    assert sorted(status["current"]["submitted"]) == ["hospital-0", "hospital-1", "hospital-2"]
    assert status["rounds_planned"] == 2 and status["storage"]["up"] and status["participants"]["approved"] == 3

    # the final global adapter out as a model, as the node's last line says, loaded offline as the README shows
    node0_log = (work / "node0.log").read_text()
    assert f"adapter export --config {node_cfgs[0]} --round 2 --out adapter" in node0_log
    exported = run(["adapter", "export", "--config", str(node_cfgs[0]), "--round", "2", "--out",
                    str(work / "adapter")], {**env, "FEDCHAIN_PASSWORD": ""})  # read-only: no password
    assert "round 2 global adapter bafk" in exported.stdout and "2 rounds VERIFIED" in exported.stdout
    card = (work / "adapter" / "README.md").read_text()
    assert deployment.address("Federation") in card and "hospital-1" in card and "2 rounds VERIFIED" in card
    offline = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load = subprocess.run([sys.executable, "-c", README_LOAD, str(work / "adapter")], capture_output=True,
                          text=True, env=offline, cwd=work, timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.startswith("ICD-10-CM code E11.9 means:") and len(load.stdout) > 30
    generated = run(["generate", "--adapter", str(work / "adapter"), "ICD-10-CM code E11.9 means:"], offline)
    assert generated.stdout.startswith("ICD-10-CM code E11.9 means:")



def wait_for(condition, limit: float, what: str, procs=None, logs=None):
    deadline = time.monotonic() + limit
    while not condition():
        for name, proc in (procs or {}).items():
            assert proc.poll() is None, f"{name} exited:\n" + logs[name].read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_late_node_an_absent_hospital_and_outages_of_chain_and_ipfs_are_ridden_out(stack):
    """Round 1 closes before any node runs (it is cancelled, the late nodes wait for round 2); one of four approved
    hospitals never shows up, so rounds 2 and 3 close below quorum right after their deadlines; IPFS is down for
    10 s across round 2's deadline and anvil for 10 s while the nodes submit to round 3. Every process rides it
    out by itself and the federation completes with one submission per node per round, audited VERIFIED."""
    base, env, record, _ = stack
    work, state_dir = base / "liveness", base / ".stack"
    work.mkdir()
    rpc, ipfs = record["rpc"], record["ipfs_api"]
    anvil_port, ipfs_port = int(rpc.rsplit(":", 1)[1]), int(ipfs.rsplit(":", 1)[1])
    addresses = {}
    for name in ("admin", "aggregator", "node0", "node1", "node2", "node3"):
        addresses[name] = run(["wallet", "new", "--out", str(work / f"{name}.json")], env).stdout.split()[0]
        run(["wallet", "fund", "--rpc", rpc, "--to", addresses[name], "--ether", "5"], env)
    run(["chain", "deploy", "--rpc", rpc, "--keystore", str(work / "admin.json"), "--aggregator",
         addresses["aggregator"], "--out", str(work / "deployment.json")], env)
    short = {"outage_seconds": 60.0}
    admin_cfg = write_config(work / "admin.toml", rpc, ipfs, "admin.json", rounds=3, round_seconds=6)  # the rules
    # the contract fixes at the first round are the admin's: the same as the aggregator's
    agg_cfg = write_config(work / "aggregator.toml", rpc, ipfs, "aggregator.json", rounds=3, round_seconds=20,
                           min_updates=4, allow_below_quorum=True)
    node_cfgs = [write_config(work / f"node{i}.toml", rpc, ipfs, f"node{i}.json", client=min(i, 2)) for i in range(4)]
    for cfg in (agg_cfg, *node_cfgs):
        cfg.write_text(cfg.read_text().replace("[storage]", f"[storage]\noutage_seconds = {short['outage_seconds']}")
                       .replace("[chain]", f"[chain]\noutage_seconds = {short['outage_seconds']}"))
    for i, cfg in enumerate(node_cfgs):
        run(["node", "join", "--config", str(cfg)], env)
        run(["admin", "approve", "--config", str(admin_cfg), addresses[f"node{i}"]], env)
    w3 = connect(rpc)
    fed = Federation(w3, Deployment.load(work / "deployment.json"))
    ledger = Ledger(fed)

    def history():
        return ledger.refresh()

    run(["round", "open", "--config", str(admin_cfg)], env)  # by hand, 6 s: over before any node runs
    first = history().rounds[1]
    wait_for(lambda: fed.next_block_time() > first.deadline, 30, "round 1's deadline")

    logs, procs = {}, {}

    def spawn(name, args):
        logs[name] = work / f"{name}.log"
        procs[name] = subprocess.Popen(FEDCHAIN + args, stdout=open(logs[name], "a"), stderr=subprocess.STDOUT,
                                       env=env, cwd=ROOT)

    for i in range(3):  # node3 never runs: an approved hospital that is absent
        spawn(f"node{i}", ["node", "run", "--config", str(node_cfgs[i])])
    wait_for(lambda: all("round 1: closed at its deadline" in logs[f"node{i}"].read_text() for i in range(3)), 120,
             "the late nodes to pass on round 1", procs, logs)
    spawn("aggregator", ["aggregator", "run", "--config", str(agg_cfg)])
    wait_for(lambda: 2 in history().rounds and len(history().rounds[2].submissions) == 3, 120,
             "three submissions to round 2", procs, logs)

    second = history().rounds[2]  # IPFS goes away just before round 2's deadline, when the aggregator verifies
    wait_for(lambda: fed.next_block_time() >= second.deadline - 3, 60, "round 2's deadline", procs, logs)
    ipfs_daemon.stop(state_dir)
    time.sleep(10)
    ipfs_daemon.start(state_dir, api_port=ipfs_port)
    wait_for(lambda: 3 in history().rounds, 120, "round 3 to open", procs, logs)

    time.sleep(0.5)  # anvil goes away while the nodes fetch, train and submit for round 3
    anvil_daemon.stop(state_dir)
    time.sleep(10)
    anvil_daemon.start(state_dir, port=anvil_port, block_time=record["block_time"])

    for name, proc in procs.items():
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} did not finish:\n" + logs[name].read_text()[-3000:])
        assert proc.returncode == 0, logs[name].read_text()[-3000:]
    text = {name: path.read_text() for name, path in logs.items()}

    h = history()
    assert [r.state.name for r in h.rounds.values()] == ["CANCELLED", "FINALIZED", "FINALIZED"]
    nodes = [Web3.to_checksum_address(addresses[f"node{i}"]) for i in range(4)]
    for round_id in (2, 3):
        rnd = h.rounds[round_id]
        assert sorted(s.node for s in rnd.submissions) == sorted(nodes[:3])  # once each, never the absent one
        assert list(rnd.finalized.verdicts) == [0, 0, 0] and rnd.finalized.accepted == 3 < rnd.min_updates
    closed_after = {r: w3.eth.get_block(h.rounds[r].finalized.block_number)["timestamp"] - h.rounds[r].deadline
                    for r in (2, 3)}
    assert 0 < closed_after[3] <= 5, closed_after  # right after the deadline, though one hospital never came
    assert 0 < closed_after[2] <= 25, closed_after  # after the deadline and the IPFS outage
    assert "round 1: no update passed verification" in text["aggregator"] and "cancelling" in text["aggregator"]
    assert re.search(r"IPFS API \S+ unreachable", text["aggregator"])
    recovered = {name: [float(x) for x in re.findall(r"reachable again after ([\d.]+) s", t)] for name, t in text.items()}
    assert recovered["aggregator"] and all(any(x >= 9 for x in recovered[f"node{i}"]) for i in range(3)), recovered
    assert all("chain RPC" in text[f"node{i}"] for i in range(3))
    print(f"\nrecovery (s): {recovered}; closed after the deadline (s): {closed_after}")
    audit = run(["audit", "--rpc", rpc, "--deployment", str(work / "deployment.json"), "--ipfs", ipfs, "--verify"],
                env)
    assert audit.stdout.strip().endswith("audit: 3 rounds: 1 CANCELLED, 2 VERIFIED")


def _bitswap(api: str) -> dict:
    answer = post_json(f"{api}/api/v0/bitswap/stat", b"", 10)
    assert answer is not None, f"bitswap/stat did not answer on {api}"
    return {key: int(answer[key]) for key in ("BlocksReceived", "BlocksSent")}


@pytest.fixture(scope="module")
def multi_stack(tmp_path_factory, model_cache, icd_base):
    """anvil and four peered IPFS nodes (`stack up --ipfs-nodes 4`): one per hospital and the aggregator's."""
    work = tmp_path_factory.mktemp("multi")
    env = {**os.environ, "FEDCHAIN_PASSWORD": PASSWORD, "FEDCHAIN_CACHE": str(model_cache),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    state = work / ".stack"
    started = time.perf_counter()
    up = run(["stack", "up", "--dir", str(state), "--anvil-port", str(free_port()), "--ipfs-port",
              str(free_ports(4)), "--ipfs-swarm-port", str(free_ports(4)), "--ipfs-nodes", "4"], env)
    record = json.loads((state / "stack.json").read_text())
    record["wall_startup"] = time.perf_counter() - started
    yield work, env, record, up.stdout
    run(["stack", "down", "--dir", str(state)], env, check=False)


def test_each_hospital_on_its_own_ipfs_node(multi_stack):
    """Three hospitals publish to their own IPFS nodes, the aggregator fetches through a fourth: every update
    reaches it over the swarm (bitswap), never through a shared API. Two rounds finalize, and an audit through
    hospital-0's node, which holds neither other hospital's updates, re-derives them VERIFIED."""
    work, env, record, up_out = multi_stack
    rpc = record["rpc"]
    apis = [node["api"] for node in record["ipfs_nodes"]]
    assert len(set(apis)) == 4 and "peered     4 IPFS nodes" in up_out
    peer_ids = [node["swarm"].rsplit("/", 1)[1] for node in record["ipfs_nodes"]]
    for i, api in enumerate(apis):
        assert ipfs_daemon.swarm_peers(api) >= set(peer_ids) - {peer_ids[i]}
    status = run(["stack", "status", "--dir", str(work / ".stack")], env).stdout.split()
    assert status == ["anvil", "up", rpc, "ipfs", "up", apis[0]] + [w for i in (1, 2, 3)
                                                                 for w in (f"ipfs-{i}", "up", apis[i])]

    addresses = {}
    for name in ("admin", "aggregator", "node0", "node1", "node2"):
        addresses[name] = run(["wallet", "new", "--out", str(work / f"{name}.json")], env).stdout.split()[0]
        run(["wallet", "fund", "--rpc", rpc, "--to", addresses[name], "--ether", "5"], env)
    run(["chain", "deploy", "--rpc", rpc, "--keystore", str(work / "admin.json"), "--aggregator",
         addresses["aggregator"], "--out", str(work / "deployment.json")], env)
    admin_cfg = write_config(work / "admin.toml", rpc, apis[3], "admin.json")
    agg_cfg = write_config(work / "aggregator.toml", rpc, apis[3], "aggregator.json")
    node_cfgs = [write_config(work / f"node{i}.toml", rpc, apis[i], f"node{i}.json", client=i) for i in range(3)]
    for i, cfg in enumerate(node_cfgs):
        run(["node", "join", "--config", str(cfg)], env)
        run(["admin", "approve", "--config", str(admin_cfg), addresses[f"node{i}"]], env)
    before = [_bitswap(api) for api in apis]

    logs, procs = {}, {}
    started = time.perf_counter()
    for name, cfg in (("aggregator", agg_cfg), *((f"node{i}", c) for i, c in enumerate(node_cfgs))):
        logs[name] = work / f"{name}.log"
        procs[name] = subprocess.Popen(FEDCHAIN + ["aggregator" if name == "aggregator" else "node", "run",
                                                   "--config", str(cfg)],
                                       stdout=open(logs[name], "a"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    finish(procs, logs, time.monotonic() + 600 - (time.perf_counter() - started))
    federation_s = time.perf_counter() - started

    history = Ledger(Federation(connect(rpc), Deployment.load(work / "deployment.json"))).refresh()
    assert [r.state.name for r in history.rounds.values()] == ["FINALIZED", "FINALIZED"]
    assert history.rounds[2].base_cid_digest == history.rounds[1].finalized.cid_digest
    hospital = {Web3.to_checksum_address(addresses[f"node{i}"]): i for i in range(3)}
    stores = [IpfsHttpStore(api, timeout_s=20) for api in apis]
    for rnd in history.rounds.values():
        assert list(rnd.finalized.verdicts) == [0, 0, 0]
        assert sorted(hospital[s.node] for s in rnd.submissions) == [0, 1, 2]
        for sub in rnd.submissions:
            cid = locate(stores[hospital[sub.node]], sub.cid_digest, sub.file_sha256)
            # added (so pinned) only on its hospital's node; the aggregator's node fetched it without pinning
            assert [store.has(cid) for store in stores] == [i == hospital[sub.node] for i in range(4)]
        final = locate(stores[3], rnd.finalized.cid_digest, rnd.finalized.file_sha256)
        assert [store.has(final) for store in stores] == [False, False, False, True]  # the aggregator's
    for name in ("node0", "node1", "node2"):
        assert "federation complete" in logs[name].read_text()

    # an auditor through hospital-0's node: hospital-1's and hospital-2's updates come over the swarm
    audited = time.perf_counter()
    audit = run(["audit", "--rpc", rpc, "--deployment", str(work / "deployment.json"), "--ipfs", apis[0],
                 "--verify"], env)
    audit_s = time.perf_counter() - audited
    assert audit.stdout.strip().endswith("audit: 2 rounds VERIFIED")

    # bitswap moved the bytes: every hospital's node sent blocks, the aggregator's received them
    deadline = time.monotonic() + 10  # js-ipfs updates its counters about once a second
    while True:
        delta = [{k: v - b[k] for k, v in _bitswap(api).items()} for api, b in zip(apis, before, strict=True)]
        if all(d["BlocksSent"] > 0 for d in delta[:3]) and delta[3]["BlocksReceived"] >= 6 \
                and delta[0]["BlocksReceived"] >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert all(d["BlocksSent"] > 0 for d in delta[:3]), delta
    assert delta[3]["BlocksReceived"] >= 6 and delta[3]["BlocksSent"] > 0, delta  # 6 updates in, 2 globals out
    assert delta[0]["BlocksReceived"] >= 4, delta  # the audit's 4 foreign updates (and the globals)
    print(f"\n4 IPFS nodes: stack up {record['wall_startup']:.1f} s, federation {federation_s:.1f} s, audit through "
          f"hospital-0's node {audit_s:.1f} s; bitswap blocks per node (received, sent): "
          f"{[(d['BlocksReceived'], d['BlocksSent']) for d in delta]}")
