"""The chain client end to end: artifact freshness check, the federation flow and its events on a real anvil,
transactions in flight, deployment records, keystores, and the `fedchain chain` commands."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from chain import compiler
from chain.clients import Status
from chain.connection import advance_time, connect
from chain.deployment import Deployment, DeploymentError
from chain.errors import ChainError
from chain.wallet import WalletError, dev_account, fund, load_keystore, new_keystore

REPO = compiler.project_root()
PASSWORD = "correct horse battery staple"
HOUR = 3600


def fedchain(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `fedchain` command line in a subprocess, importing the packages found under `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    env.pop("FEDCHAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fednode", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedchain: error: "), proc.stderr
    return lines[0]


# Artifact freshness ----------------------------------------------------------------------------------------------

def test_committed_artifacts_are_fresh():
    """The check CI relies on: source digests match and a fresh compile gives the same bytecode and ABI."""
    proc = fedchain("chain", "compile", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "artifacts are up to date" in proc.stdout


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The contracts, artifacts and Python packages copied to a temporary root (node_modules linked)."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("contracts", "chain", "devstack", "fednode"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=ignore)
    (tmp_path / "node_modules").symlink_to(REPO / "node_modules")
    return tmp_path


def test_a_modified_source_makes_the_check_fail(repo_copy):
    out_dir = repo_copy / "chain" / "artifacts"
    assert compiler.check(repo_copy, out_dir, recompile=False) == []
    source = repo_copy / "contracts" / "ParticipantRegistry.sol"
    source.write_text(source.read_text().replace("Ask to take part", "Ask to join"))

    [problem] = compiler.check(repo_copy, out_dir, recompile=False)
    assert "Federation.json: stale" in problem and "contracts/ParticipantRegistry.sol" in problem
    proc = fedchain("chain", "compile", "--check", cwd=repo_copy)
    assert proc.returncode == 1
    assert "contracts/ParticipantRegistry.sol" in proc.stderr and "Traceback" not in proc.stderr


# The federation on a real anvil ----------------------------------------------------------------------------------

@pytest.mark.anvil
def test_federation_flow_and_its_events_on_anvil(anvil_fed):
    fed = anvil_fed
    nodes = [fed.client(i) for i in (1, 2, 3)]
    for i, node in enumerate(nodes, start=1):
        node.join(fed.digest(f"model {i}"), fed.digest(f"card {i}"))
    for node in nodes:
        fed.admin.approve(node.address)
    first = fed.open_round(min_updates=2)
    for node in nodes:
        node.submit_update(first, fed.digest(f"cid {node.address}"), fed.digest("sha"), 10, fed.digest("m"))
    fed.aggregator.finalize(first, fed.digest("global"), fed.digest("global sha"), bytes([0, 0, 5]))
    fed.admin.revoke(nodes[0].address, reason=1)
    second = fed.open_round()
    with pytest.raises(ChainError) as info:
        nodes[0].submit_update(second, fed.digest("late"), fed.digest("sha"), 10, fed.digest("m"))
    assert info.value.error_name == "NotParticipant"
    assert str(info.value) == f"NotParticipant: {nodes[0].address} is not an approved participant (status Revoked)"

    assert fed.admin.round(first).accepted == 2
    paged = fed.admin.events(page=2)
    assert paged == fed.admin.events()
    assert [e.name for e in paged] == ["RoleGranted"] * 2 + ["Joined"] * 3 + ["Approved"] * 3 + [
        "Configured", "RoundOpened"] + ["UpdateSubmitted"] * 3 + ["RoundFinalized", "Revoked", "RoundOpened"]
    positions = [(e.block_number, e.log_index) for e in paged]
    assert positions == sorted(positions) and len({e.block_number for e in paged}) > 2  # more than one page
    submitted = [(e.args["node"], e.args["index"]) for e in paged if e.name == "UpdateSubmitted"]
    assert submitted == [(n.address, i) for i, n in enumerate(nodes)]
    assert paged[-3].args["verdicts"] == bytes([0, 0, 5])


@contextmanager
def manual_mining(w3):
    """Keep anvil's transactions pending until the returned function mines them into one block."""
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        yield lambda: w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])


@pytest.mark.anvil
def test_one_sender_with_transactions_pending_together(anvil_fed):
    fed = anvil_fed
    nodes = fed.joined_nodes([1, 2, 3])
    admin = fed.admin
    with manual_mining(fed.w3) as mine:
        hashes = [admin.sender.transact(admin.contract.functions.approve(n.address), wait=False) for n in nodes]
        assert fed.w3.eth.get_transaction_count(admin.address, "pending") == \
            fed.w3.eth.get_transaction_count(admin.address) + 3
        mine()
        receipts = [admin.sender.wait(h) for h in hashes]
    assert len({r.block_number for r in receipts}) == 1
    assert all(admin.participant(n.address).status == Status.APPROVED for n in nodes)


def pending_submission(fed, node, round_id: int, label: str) -> str:
    return node.submit_update(round_id, fed.digest(label), fed.digest("sha"), 10, fed.digest("m"), wait=False)


@pytest.mark.anvil
def test_a_revert_caused_by_an_earlier_transaction_of_its_block_is_decoded(anvil_fed):
    fed = anvil_fed
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    with manual_mining(fed.w3) as mine:
        first = pending_submission(fed, node, round_id, "first")
        with pytest.raises(ChainError) as refused:  # estimated on the pending block, which holds the first
            pending_submission(fed, node, round_id, "second")
        assert refused.value.error_name == "AlreadySubmitted"
        # sent anyway: a given gas limit skips the estimate (as a second process of the same node might)
        second = node.sender.transact(node.contract.functions.submitUpdate(
            round_id, fed.digest("second"), fed.digest("sha"), 10, fed.digest("m")), gas=300_000, wait=False)
        mine()
    assert node.sender.wait(first).block_number == fed.w3.eth.block_number
    with pytest.raises(ChainError) as info:
        node.sender.wait(second)
    assert info.value.error_name == "AlreadySubmitted"


@pytest.mark.anvil
def test_a_revert_caused_by_its_blocks_time_is_decoded(anvil_fed):
    fed = anvil_fed
    [node] = fed.approved_nodes(1)
    round_id = fed.open_round()
    with manual_mining(fed.w3):
        late = pending_submission(fed, node, round_id, "late")
        advance_time(fed.w3, HOUR + 1)  # mines it in a block past the deadline
    with pytest.raises(ChainError) as info:
        node.sender.wait(late)
    assert info.value.error_name == "DeadlinePassed"


# Deployment records, keystores, the command line -----------------------------------------------------------------

@pytest.mark.anvil
def test_deployment_record_round_trip_and_chain_check(anvil_fed, embedded_fed, tmp_path):
    record = tmp_path / "deployments" / "anvil.json"
    anvil_fed.deployment.save(record)
    loaded = Deployment.load(record)
    assert loaded == anvil_fed.deployment
    loaded.check_chain(anvil_fed.w3)

    with pytest.raises(DeploymentError, match=f"deployment is for chain id 31337, the RPC endpoint is chain id "
                                              f"{embedded_fed.w3.eth.chain_id}$"):
        loaded.check_chain(embedded_fed.w3)
    elsewhere = dataclasses.replace(loaded, contracts={
        "Federation": dataclasses.replace(loaded.contracts["Federation"], address=anvil_fed.admin.address)})
    with pytest.raises(DeploymentError, match=f"no Federation contract at {anvil_fed.admin.address}"):
        elsewhere.check_chain(anvil_fed.w3)
    with pytest.raises(DeploymentError, match="not found"):
        Deployment.load(tmp_path / "missing.json")
    record.write_text("{not json")
    with pytest.raises(DeploymentError, match="is not JSON"):
        Deployment.load(record)


@pytest.fixture(scope="module")
def keystore(tmp_path_factory):
    path = tmp_path_factory.mktemp("wallet") / "deployer.json"
    return path, new_keystore(path, PASSWORD)


def test_keystore_round_trip_and_wrong_password(keystore):
    path, account = keystore
    assert load_keystore(path, PASSWORD).key == account.key
    with pytest.raises(WalletError) as info:
        load_keystore(path, "wrong password")
    assert str(info.value) == f"wrong password for {path}"
    with pytest.raises(WalletError, match="already exists"):
        new_keystore(path, PASSWORD)
    with pytest.raises(WalletError, match="empty keystore password"):
        new_keystore(path.with_name("other.json"), "")


@pytest.mark.anvil
def test_cli_deploys_with_a_keystore(anvil, keystore, tmp_path):
    path, account = keystore
    w3 = connect(anvil.url)
    fund(w3, dev_account(w3, 0), account.address, 10**18)
    aggregator = dev_account(w3, 9).address
    record = tmp_path / "deployment.json"
    proc = fedchain("chain", "deploy", "--rpc", anvil.url, "--keystore", str(path), "--aggregator", aggregator,
                    "--out", str(record), env={"FEDCHAIN_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    deployment = Deployment.load(record)
    deployment.check_chain(w3)
    assert (deployment.chain_id, deployment.deployer, deployment.aggregator) == (31337, account.address, aggregator)
    assert deployment.address("Federation") in proc.stdout


def test_cli_deploy_to_an_unreachable_rpc_fails_in_one_line():
    line = assert_one_line_error(fedchain("chain", "deploy", "--rpc", "http://127.0.0.1:1"))
    assert "http://127.0.0.1:1" in line


def test_embedded_chain_finds_old_and_new_transactions_by_hash():
    """The embedded backend looks transactions up through the chain's hash index (eth-tester scanned every block
    back from the head): the first transaction of a longer chain is found in its block, with its receipt and
    logs, and an unknown hash is still 'not found'."""
    from eth_tester.exceptions import TransactionNotFound
    from web3.exceptions import TransactionNotFound as Web3TransactionNotFound

    w3 = connect("embedded")
    funder = dev_account(w3, 0)
    first = w3.eth.send_transaction({"from": funder.address, "to": dev_account(w3, 1).address, "value": 1})
    for _ in range(5):
        fund(w3, funder, dev_account(w3, 2).address, 1)
    receipt, tx = w3.eth.get_transaction_receipt(first), w3.eth.get_transaction(first)
    assert receipt["blockNumber"] == tx["blockNumber"] == 1 and receipt["status"] == 1
    assert w3.eth.block_number == 6
    backend = w3.provider.ethereum_tester.backend
    with pytest.raises(TransactionNotFound):
        backend.get_transaction_receipt(b"\x01" * 32)
    with pytest.raises(Web3TransactionNotFound):
        w3.eth.get_transaction_receipt("0x" + "01" * 32)
