"""A whole federation in one process: a deployed contract (the embedded chain by default, or a local dev chain such
as anvil), an aggregator and one node per hospital, each with its own wallet, joined and approved. The demo, the
quality benchmark and the tests build their federations with `EmbeddedFederation.create` and run rounds with
`run_round`: open -> every node participates -> finalize."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eth_account import Account
from web3 import Web3

from chain.clients import Federation
from chain.connection import connect
from chain.deployment import Deployment, deploy
from chain.wallet import dev_account, fund

from ..learning.adapters import make_trainer
from ..learning.data import ClientData
from ..learning.settings import ClientObjective, LoraSettings, PromptSettings, TrainSettings
from ..learning.training import AdapterTrainer
from ..protocol.aggregator import Aggregator, AwaitingShares, RoundResult
from ..protocol.ledger import RoundRecord
from ..protocol.methods import Method
from ..protocol.node import Node, SubmittedUpdate
from ..protocol.rules import FederationRules
from ..storage import Storage
from ..timing import Stopwatch

ADMIN_ACCOUNT, AGGREGATOR_ACCOUNT = 0, 9  # dev accounts of the embedded chain and of anvil
NODE_FUNDING_WEI = 10**20


def node_account(index: int):
    """A deterministic wallet per hospital (funded from the dev account when the federation is created)."""
    return Account.from_key(hashlib.sha256(f"fedchain-demo-hospital-{index}".encode()).digest())


def method_trainers(base, method: Method, lora: LoraSettings, prompt: PromptSettings, clients: int
                    ) -> tuple[AdapterTrainer, list[AdapterTrainer]]:
    """The trainer of the method's global adapter config and one per hospital (shared where configs agree)."""
    objective = ClientObjective.from_json(method.client)
    by_config: dict[str, AdapterTrainer] = {}

    def trainer_for(config: dict) -> AdapterTrainer:
        key = json.dumps(config, sort_keys=True)
        if key not in by_config:
            by_config[key] = make_trainer(base, method.adapter, config, objective)
        return by_config[key]

    return (trainer_for(method.global_config(lora, prompt)),
            [trainer_for(method.client_config(i, lora, prompt)) for i in range(clients)])


@dataclass(frozen=True)
class RoundRun:
    """One round as run in process: its on-chain record, each node's submission (None: it did not submit) and
    the aggregator's result."""
    record: RoundRecord
    updates: list[SubmittedUpdate | None]
    result: RoundResult


@dataclass
class EmbeddedFederation:
    w3: Web3
    deployment: Deployment
    admin: Federation
    aggregator: Aggregator
    nodes: list[Node]
    joins: list[dict]                                  # per node: its join and approval (gas, model identity)
    base: tuple[bytes, bytes] | None = field(default=None)  # (CID digest, sha256) the next round starts from

    @property
    def federation_id(self) -> str:
        return self.deployment.federation_id

    @classmethod
    def create(cls, trainers: Sequence[AdapterTrainer], clients: Sequence[ClientData], rules: FederationRules,
               train: TrainSettings, store: Storage, watch: Stopwatch | None = None, w3: Web3 | None = None,
               first_account: int = 0, log: Callable[[str], None] = lambda m: None,
               submit: Sequence[str] | str = "direct") -> EmbeddedFederation:
        """Deploy on a fresh embedded chain (or on `w3`'s dev chain; admin = dev account 0, aggregator = dev
        account 9), fund wallet `first_account + i` for hospital i, and have each join with its own trainer and
        be approved. `submit` (one for all, or one per hospital): "direct" sends each update from the hospital's
        wallet, "relay" signs it and hands it to the aggregator, which relays it in a batch."""
        watch = watch or Stopwatch()
        with watch("chain"):
            w3 = w3 or connect("embedded")
            admin, agg_account = dev_account(w3, ADMIN_ACCOUNT), dev_account(w3, AGGREGATOR_ACCOUNT)
            deployment = deploy(w3, admin, agg_account.address)
            accounts = [node_account(first_account + i) for i in range(len(clients))]
            for account in accounts:
                fund(w3, admin, account.address, NODE_FUNDING_WEI)
        admin_fed = Federation(w3, deployment, admin)
        aggregator = Aggregator(Federation(w3, deployment, agg_account), store, rules, watch, log=log)
        paths = [submit] * len(clients) if isinstance(submit, str) else list(submit)
        if set(paths) - {"direct", "relay"}:
            raise ValueError(f"submit must be 'direct' or 'relay', got {paths}")
        nodes = [Node(Federation(w3, deployment, a), store, t, c, rules, train, watch,
                      relay=aggregator.relayer.receive if path == "relay" else None)
                 for a, t, c, path in zip(accounts, trainers, clients, paths, strict=True)]
        joins = []
        for node in nodes:
            receipt = node.join()
            with watch("chain"):
                approval = admin_fed.approve(node.address)
            joins.append({"client": node.client.name, "node": node.address, "join_gas": receipt.gas_used,
                          "approve_gas": approval.gas_used, "model_id": "0x" + node.model_id.hex()})
        return cls(w3, deployment, admin_fed, aggregator, nodes, joins)

    def start(self, initial_state: dict) -> str:
        """Publish the initial adapter the first round starts from; returns its CID."""
        cid, cid_digest, sha = self.aggregator.publish_global(0, initial_state)
        self.base = (cid_digest, sha)
        return cid

    def open(self, min_updates: int = 1, round_seconds: int = 3600) -> RoundRecord:
        """Open the next round from the last global adapter."""
        if self.base is None:
            raise ValueError("publish the initial adapter first (EmbeddedFederation.start)")
        return self.aggregator.open_round(*self.base, round_seconds, min_updates)

    def finalize(self, rec: RoundRecord, revealers: Sequence[Node] | None = None) -> RoundResult:
        """Verify, merge and finalize an open round; the next one starts from its global adapter. A masked round
        first has its survivors fixed, then every node in `revealers` (default: all) reveals its shares."""
        try:
            result = self.aggregator.finalize(rec)
        except AwaitingShares:
            for node in self.nodes if revealers is None else revealers:
                node.reveal(node.ledger.refresh().rounds[rec.round_id])
            result = self.aggregator.finalize(rec)
        self.base = (result.cid_digest, result.file_sha256)
        return result

    def run_round(self, nodes: Sequence[Node] | None = None, min_updates: int = 1,
                  round_seconds: int = 3600) -> RoundRun:
        """Open a round, let every node in `nodes` (default: all) participate, and finalize it (the same nodes
        reveal shares when the round is masked)."""
        rec = self.open(min_updates, round_seconds)
        nodes = self.nodes if nodes is None else nodes
        updates = [node.participate(rec) for node in nodes]
        return RoundRun(rec, updates, self.finalize(rec, nodes))
