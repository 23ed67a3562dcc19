"""One TOML config file per participant (node, aggregator, admin). Every error names the file, the key and what
was expected."""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..learning.data import DataConfig
from ..learning.settings import (ADAPTERS, ClientObjective, FullSettings, LoraSettings, PromptSettings, SettingsError,
                                TrainSettings)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, key and expected value."""


def _at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


@dataclass(frozen=True)
class ChainSection:
    rpc: str = "http://127.0.0.1:8545"   # JSON-RPC URL of any EVM chain
    deployment: str = "deployment.json"   # deployment record written by `fedchain chain deploy`
    outage_seconds: float = 300.0         # ride out an unreachable RPC endpoint this long before giving up

    def __post_init__(self) -> None:
        _at_least("outage_seconds", self.outage_seconds, 0)


@dataclass(frozen=True)
class StorageSection:
    ipfs: str = "http://127.0.0.1:5001"   # Kubo RPC API URL / multiaddr, or "embedded:PATH"
    timeout: float = 30.0                 # seconds without a byte from the node before a fetch fails
    outage_seconds: float = 300.0         # ride out an unreachable IPFS node this long before giving up

    def __post_init__(self) -> None:
        _at_least("outage_seconds", self.outage_seconds, 0)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")


@dataclass(frozen=True)
class WalletSection:
    keystore: str = ""                    # geth v3 keystore (`fedchain wallet new`)
    password_file: str = ""               # its password on the first line; else $FEDCHAIN_PASSWORD_<KEYSTORE NAME>,
                                          #   $FEDCHAIN_PASSWORD, or a prompt in a terminal


@dataclass(frozen=True)
class NodeSection:
    submit: str = "direct"                # "direct": this wallet sends each update (needs ether); "relay": it signs
                                          #   the update and the aggregator relays it (no ether)
    relay: str = "http://127.0.0.1:8547"  # the aggregator's relay endpoint ([aggregator] relay_listen)

    def __post_init__(self) -> None:
        if self.submit not in ("direct", "relay"):
            raise ValueError(f'submit must be "direct" or "relay", got {self.submit!r}')
        if not self.relay.startswith(("http://", "https://")):
            raise ValueError(f"relay must be an http(s) URL, got {self.relay!r}")


@dataclass(frozen=True)
class AggregatorSection:
    relay_listen: str = ""                # "host:port" where hospitals hand over signed updates; "" = no relay

    def __post_init__(self) -> None:
        host, _, port = self.relay_listen.rpartition(":")
        if self.relay_listen and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f'relay_listen must be "host:port", got {self.relay_listen!r}')


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny"                    # "tiny" or "smollm2"
    cache_dir: str = ""                   # default $FEDCHAIN_CACHE or ~/.cache/fedchain
    private_dir: str = "private"          # this hospital's private adapters (personalized rules), never published


@dataclass(frozen=True)
class DataSection:
    source: str = "icd10"                 # "icd10" (ICD-10-CM descriptions), "drugs" (drug reviews) or "mixed"
    partition: str = "natural"            # "natural" (by chapter / condition) or "dirichlet"
    alpha: float = 1.0                    # Dirichlet concentration (partition = "dirichlet"); lower = more skewed
    num_clients: int = 3                  # number of hospitals the data is split among
    client: int = 0                       # this hospital's partition index
    train_per_client: int = 256           # training examples per hospital
    eval_per_client: int = 64             # held-out examples per hospital
    seed: int = 0                         # seed of the split (and of the tiny base model's pretraining)


@dataclass(frozen=True)
class FederationSection:
    rounds: int = 3                       # rounds the federation runs
    round_seconds: int = 600              # a round's deadline, from its opening (chain time)
    min_updates: int = 1                  # quorum: accepted updates a round needs
    allow_below_quorum: bool = True       # at the deadline: finalize below quorum (true) or cancel the round
    aggregation: str = "fedavg"           # fedavg, fedavgm, fedadam, fedyogi
    params: dict = field(default_factory=dict)   # the rule's parameters, e.g. {eta = 0.01, beta_1 = 0.9}
    privacy: dict = field(default_factory=dict)  # e.g. {mechanism = "dp_sgd", max_grad_norm = 1.0, target_epsilon
                                                 #   = 8, delta = 1e-5} or {mechanism = "hospital", ...}; {} = off
    weighting: str = "num_samples"        # merge weights: "num_samples" (claimed samples) or "uniform"
    encoding: dict = field(default_factory=dict)  # how updates travel, e.g. {dtype = "int8", block_size = 128,
                                          #   top_k = 0.0} (also float16, bfloat16); {} = float32 adapters
    secure_aggregation: dict = field(default_factory=dict)  # e.g. {threshold = 0.6, clip = 1.0, scale_bits = 20}:
                                          #   updates masked, the aggregator sees only their sum; {} = off (copy
                                          #   screening, which reads single updates, is then off too)
    merge_order: str = "sha256"           # "sha256": the same updates give the same global whatever their arrival
                                          #   order; "submission": on-chain order
    adapter: str = "lora"                 # "lora" ([lora] settings), "prompt" ([prompt] settings) or "full" (every
                                          #   weight of the base trains and travels: raise max_adapter_bytes)
    client: dict = field(default_factory=dict)   # what local training adds, e.g. {proximal_mu = 0.01} (FedProx),
                                                 #   {freeze_a = true} (FFA-LoRA), {local_rank = 4,
                                                 #   orthogonal_lambda = 0.1} (personalized), {loss = "pretrain"}
                                                 #   (every token of the text, not just the completion); {} = plain
    global_rank: int = 0                  # the global LoRA rank when this node's [lora] r is lower (lora_exact
                                          #   merges ranks up to it); 0 = [lora] r
    max_update_norm: float = 50.0         # updates with a larger L2 norm (from the round's start) are rejected
    max_adapter_bytes: int = 64 * 1024 * 1024    # larger adapter files are rejected
    poll_seconds: float = 1.0             # how often node and aggregator read the chain
    seed: int = 0                         # seed of the initial adapter


@dataclass(frozen=True)
class Config:
    path: Path
    chain: ChainSection = field(default_factory=ChainSection)
    storage: StorageSection = field(default_factory=StorageSection)
    wallet: WalletSection = field(default_factory=WalletSection)
    node: NodeSection = field(default_factory=NodeSection)
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    federation: FederationSection = field(default_factory=FederationSection)

    def resolve(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.path.parent / path)

    @property
    def cache_dir(self) -> Path:
        if self.model.cache_dir:
            return self.resolve(self.model.cache_dir)
        return Path(os.environ.get("FEDCHAIN_CACHE", Path.home() / ".cache" / "fedchain"))

    @property
    def adapter_config(self) -> dict:
        """This participant's own adapter config."""
        return {"lora": self.lora, "prompt": self.prompt, "full": FullSettings()}[self.federation.adapter].to_json()

    @property
    def global_adapter_config(self) -> dict:
        """The federation's global adapter config (the rules' `lora`)."""
        if self.federation.adapter == "lora" and self.federation.global_rank:
            return dataclasses.replace(self.lora, r=self.federation.global_rank).to_json()
        return self.adapter_config

    @property
    def data_config(self) -> DataConfig:
        d = self.data
        return DataConfig(source=d.source, partition=d.partition, alpha=d.alpha, num_clients=d.num_clients,
                          train_per_client=d.train_per_client, eval_per_client=d.eval_per_client, seed=d.seed)


SECTIONS = {name: cls for name, cls in typing.get_type_hints(Config).items() if name != "path"}
_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}


def _expected(type_) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "dict": "a table"}.get(
        str(type_), "a list of strings")


def _section(path: Path, name: str, cls, table) -> object:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{path}: [{name}] unknown key {key!r} (expected one of: {', '.join(fields)})")
        type_name = fields[key].type if isinstance(fields[key].type, str) else fields[key].type.__name__
        expected = _TYPES.get(type_name)
        if expected is None:  # tuple[str, ...]
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, expected) and not (type_name != "bool" and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{path}: [{name}] {key} must be {_expected(type_name)}, got {value!r}")
        table[key] = float(value) if type_name == "float" else value
    try:
        return cls(**table)
    except ValueError as exc:
        raise ConfigError(f"{path}: [{name}] {exc}") from None


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (expected: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = _section(path, name, cls, dict(raw.get(name, {})))
    config = Config(path=path.resolve(), **sections)
    d = config.data
    if not 0 <= d.client < d.num_clients:
        raise ConfigError(f"{path}: [data] client must be in 0..{d.num_clients - 1}, got {d.client}")
    try:
        config.data_config
    except ValueError as exc:
        raise ConfigError(f"{path}: [data] {exc}") from None
    f = config.federation
    if f.adapter not in ADAPTERS:
        raise ConfigError(f"{path}: [federation] adapter must be one of {', '.join(ADAPTERS)}, got {f.adapter!r}")
    try:
        ClientObjective.from_json(f.client)
    except SettingsError as exc:
        raise ConfigError(f"{path}: [federation] client: {exc}") from None
    if f.global_rank < 0:
        raise ConfigError(f"{path}: [federation] global_rank must be >= 0, got {f.global_rank}")
    return config
