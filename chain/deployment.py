"""Deploy the contracts and keep a deployment record (in the spirit of Hardhat/Foundry deployment files)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from web3 import Web3

from .compiler import load_artifact
from .transactions import TxSender

AGGREGATOR_ROLE = Web3.keccak(text="AGGREGATOR_ROLE")
ADMIN_DELAY_S = 2 * 24 * 3600  # an admin transfer is accepted no sooner than this after it was started


class DeploymentError(ValueError):
    """A deployment record is missing, malformed, or for another chain."""


@dataclass(frozen=True)
class DeployedContract:
    address: str
    tx_hash: str
    block_number: int
    gas_used: int
    artifact_digest: str  # sha256 of the creation bytecode


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    deployer: str
    aggregator: str
    contracts: dict[str, DeployedContract]
    compiler: dict
    source_digest: str
    deployed_at: int

    @property
    def start_block(self) -> int:
        return min(c.block_number for c in self.contracts.values())

    def address(self, name: str) -> str:
        return self.contracts[name].address

    @property
    def federation_id(self) -> str:
        """"<chain id>:<lower-case Federation address>": what every adapter file's metadata names."""
        return f"{self.chain_id}:{self.address('Federation').lower()}"

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Deployment":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeploymentError(f"deployment record {path} not found; run `fedchain chain deploy`") from None
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"deployment record {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
        try:
            contracts = {n: DeployedContract(**c) for n, c in data.pop("contracts").items()}
            return cls(contracts=contracts, **data)
        except (KeyError, TypeError) as exc:
            raise DeploymentError(f"deployment record {path} is malformed: {exc}") from None

    def check_chain(self, w3: Web3) -> None:
        if w3.eth.chain_id != self.chain_id:
            raise DeploymentError(f"deployment is for chain id {self.chain_id}, the RPC endpoint is chain id "
                                  f"{w3.eth.chain_id}")
        for name, c in self.contracts.items():
            if not w3.eth.get_code(c.address):
                raise DeploymentError(f"no {name} contract at {c.address} on chain {self.chain_id}")


def _deploy_one(sender: TxSender, name: str, *args) -> DeployedContract:
    artifact = load_artifact(name)
    factory = sender.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = sender.transact(factory.constructor(*args))
    return DeployedContract(
        address=receipt.raw["contractAddress"], tx_hash=receipt.tx_hash, block_number=receipt.block_number,
        gas_used=receipt.gas_used,
        artifact_digest=hashlib.sha256(bytes.fromhex(artifact["bytecode"][2:])).hexdigest())


def deploy(w3: Web3, deployer: LocalAccount, aggregator: str | None = None,
           admin_delay: int = ADMIN_DELAY_S) -> Deployment:
    """Deploy the Federation contract (deployer = admin, handed over in two steps `admin_delay` seconds apart) and
    grant the aggregator role."""
    sender = TxSender(w3, deployer)
    aggregator = Web3.to_checksum_address(aggregator or deployer.address)
    federation = _deploy_one(sender, "Federation", deployer.address, admin_delay)
    artifact = load_artifact("Federation")
    contract = w3.eth.contract(address=federation.address, abi=artifact["abi"])
    sender.transact(contract.functions.grantRole(AGGREGATOR_ROLE, aggregator))
    return Deployment(
        chain_id=w3.eth.chain_id, deployer=deployer.address, aggregator=aggregator,
        contracts={"Federation": federation},
        compiler=artifact["compiler"], source_digest=artifact["sourceDigest"], deployed_at=int(time.time()))
