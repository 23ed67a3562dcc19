"""Shared chain fixtures: a deployed federation on the embedded chain (reset for every test) and a real anvil."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from support import CORPUS, free_port, require
from web3 import Web3

from chain.clients import Federation
from chain.connection import EMBEDDED, connect
from chain.deployment import Deployment, deploy
from chain.wallet import dev_account
from devstack import anvil as anvil_process
from devstack import ipfs as ipfs_daemon

ADMIN_INDEX = 0
AGGREGATOR_INDEX = 9
DEV_NODE_INDICES = range(1, AGGREGATOR_INDEX)  # dev accounts that are neither admin nor aggregator
NODE_FUNDING_WEI = 10**18
# Explicit gas for bulk set-up transactions: skips eth-tester's gas estimation (a binary search of ~13 runs).
SETUP_GAS = 300_000


@dataclass
class FedChain:
    """A deployed federation: admin = dev account 0, aggregator = dev account 9, nodes numbered from 1."""

    w3: Web3
    deployment: Deployment
    _accounts: dict[int, LocalAccount] = field(default_factory=dict, repr=False)

    @staticmethod
    def digest(label: str) -> bytes:
        """A distinct non-zero 32-byte value for `label`."""
        return hashlib.sha256(label.encode()).digest()

    @classmethod
    def deploy(cls, w3: Web3) -> "FedChain":
        admin = dev_account(w3, ADMIN_INDEX)
        return cls(w3, deploy(w3, admin, dev_account(w3, AGGREGATOR_INDEX).address))

    def __post_init__(self):
        self.admin = Federation(self.w3, self.deployment, dev_account(self.w3, ADMIN_INDEX))
        self.aggregator = Federation(self.w3, self.deployment, dev_account(self.w3, AGGREGATOR_INDEX))

    def node_account(self, index: int) -> LocalAccount:
        """Node `index` >= 1: dev accounts 1..8, then deterministic keys funded by the admin on first use."""
        if index < 1:
            raise ValueError(f"node indices start at 1, got {index}")
        if index not in self._accounts:
            if index in DEV_NODE_INDICES:
                account = dev_account(self.w3, index)
            else:
                account = Account.from_key(hashlib.sha256(f"fedchain test node {index}".encode()).digest())
                self.admin.sender.send_value(account.address, NODE_FUNDING_WEI)  # the admin's sender keeps its nonce
            self._accounts[index] = account
        return self._accounts[index]

    def client(self, index: int) -> Federation:
        """A client acting as node `index` (not joined yet)."""
        return self.admin.as_account(self.node_account(index))

    def joined_nodes(self, indices) -> list[Federation]:
        """Nodes that joined (model id = digest of their index) and wait for approval."""
        nodes = [self.client(i) for i in indices]
        hashes = [n.sender.transact(n.contract.functions.join(self.digest(f"model {i}"), self.digest(f"card {i}")),
                                    gas=SETUP_GAS, wait=False) for i, n in zip(indices, nodes)]
        for n, tx_hash in zip(nodes, hashes):
            n.sender.wait(tx_hash)
        return nodes

    def approved_nodes(self, count: int, first: int = 1) -> list[Federation]:
        """`count` joined and approved nodes, numbered from `first`."""
        nodes = self.joined_nodes(range(first, first + count))
        admin = self.admin.sender
        hashes = [admin.transact(self.admin.contract.functions.approve(n.address), gas=SETUP_GAS, wait=False)
                  for n in nodes]
        for tx_hash in hashes:
            admin.wait(tx_hash)
        return nodes

    def configure(self) -> None:
        """Register the initial adapter and the rules, unless already done."""
        if self.admin.rules_digest() == bytes(32):
            self.aggregator.configure(self.digest("initial cid"), self.digest("initial sha"), self.digest("rules"))

    def open_round(self, duration: int = 3600, min_updates: int = 1, allow_below_quorum: bool = True) -> int:
        """Open the next round as the aggregator from the lineage head under the federation's rules, closing
        `duration` seconds from the chain's time."""
        self.configure()
        round_id, _ = self.aggregator.open_round(*self.admin.lineage_head(), self.admin.rules_digest(),
                                                 self.admin.chain_time() + duration, min_updates, allow_below_quorum)
        return round_id

    def submit_all(self, round_id: int, nodes: list[Federation], samples: int = 100) -> list[str]:
        """Every node submits an update (all sent before any is waited for); returns the transaction hashes."""
        hashes = []
        for n in nodes:
            call = n.contract.functions.submitUpdate(round_id, self.digest(f"cid {round_id} {n.address}"),
                                                     self.digest(f"sha {round_id} {n.address}"), samples,
                                                     self.digest(f"metrics {n.address}"))
            hashes.append(n.sender.transact(call, gas=SETUP_GAS, wait=False))
        for n, tx_hash in zip(nodes, hashes):
            n.sender.wait(tx_hash)
        return hashes


@pytest.fixture(scope="session")
def _embedded_snapshot():
    w3 = connect(EMBEDDED)
    fed = FedChain.deploy(w3)
    return w3, fed.deployment, w3.provider.ethereum_tester.take_snapshot()


@pytest.fixture
def embedded_fed(_embedded_snapshot) -> FedChain:
    """A federation on the embedded chain exactly as right after its deployment: the chain is reverted to a
    snapshot taken then (same state and block numbers as a fresh chain, without the 0.4 s redeploy)."""
    w3, deployment, snapshot = _embedded_snapshot
    w3.provider.ethereum_tester.revert_to_snapshot(snapshot)
    return FedChain(w3, deployment)


@pytest.fixture(scope="module")
def anvil(tmp_path_factory):
    """A real anvil testnet for this module (skipped if the binary is missing, except under CI=true)."""
    require(anvil_process.anvil_binary, anvil_process.AnvilError, "anvil")
    state_dir = tmp_path_factory.mktemp("anvil")
    handle = anvil_process.start(state_dir, port=free_port())
    yield handle
    anvil_process.stop(state_dir)


@pytest.fixture(scope="module")
def local_stack(anvil, tmp_path_factory):
    """The local stack in this process's reach: the module's real anvil and a real IPFS node."""
    require(ipfs_daemon.ipfs_command, ipfs_daemon.IpfsDaemonError, "IPFS node")
    state_dir = tmp_path_factory.mktemp("ipfs")
    handle = ipfs_daemon.start(state_dir, api_port=free_port())
    yield anvil, handle
    ipfs_daemon.stop(state_dir)


@pytest.fixture
def anvil_fed(anvil) -> FedChain:
    """A fresh deployment on the module's anvil."""
    return FedChain.deploy(connect(anvil.url))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A per-session model cache, so every test run builds its tiny base from scratch exactly once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """The cache holding only tiny_base (test_model_training checks it leaves nothing else behind)."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_base(tiny_cache):
    """A tiny base model briefly pretrained on support.CORPUS (drug-condition sentences)."""
    from fednode.learning.models import load_base_model

    return load_base_model("tiny", tiny_cache, corpus=lambda: CORPUS, seed=0)


@pytest.fixture(scope="session")
def icd_base(model_cache):
    """The demo's tiny base model, briefly pretrained on the ICD-10 corpus of the default data config."""
    from fednode.learning.data import DataConfig, corpus_texts
    from fednode.learning.models import load_base_model

    return load_base_model("tiny", model_cache, corpus=lambda: corpus_texts(DataConfig(), 4000), seed=0)
