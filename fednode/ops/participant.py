"""Everything a participant process builds from its config: chain connection, deployment, wallet, storage,
base model, local data and the federation's rules."""
from __future__ import annotations

import logging
import threading
import time
from functools import cached_property

from chain.clients import Federation
from chain.connection import connect
from chain.deployment import Deployment
from chain.wallet import load_keystore
from web3 import Web3

from ..protocol.rules import FederationRules, RulesError
from ..storage import Storage, open_storage
from .config import Config, ConfigError
from .passwords import password_for

SLOW_LOAD_SECONDS = 3.0   # a base-model load that takes longer says what it is doing


class Participant:
    """Lazily built resources of one participant; each is created once, when first used."""

    def __init__(self, config: Config, outage_seconds: float | None = None):
        self.config = config
        self.outage_seconds = outage_seconds  # overrides the config's for chain and storage (status: fail fast)

    @cached_property
    def w3(self) -> Web3:
        return connect(self.config.chain.rpc, outage_seconds=self._outage(self.config.chain.outage_seconds))

    @cached_property
    def deployment(self) -> Deployment:
        deployment = Deployment.load(self.config.resolve(self.config.chain.deployment))
        deployment.check_chain(self.w3)
        return deployment

    @cached_property
    def account(self):
        keystore = self.config.wallet.keystore
        if not keystore:
            raise ConfigError(f"{self.config.path}: [wallet] keystore is required for this command")
        path = self.config.resolve(keystore)
        if not path.is_file():
            raise ConfigError(f"{self.config.path}: [wallet] keystore {path} not found (create it with "
                              "`fedchain wallet new`)")
        password_file = self.config.wallet.password_file
        return load_keystore(path, password_for(keystore, self.config.resolve(password_file) if password_file
                                                else None))

    @cached_property
    def federation(self) -> Federation:
        return Federation(self.w3, self.deployment, self.account)

    @cached_property
    def reader(self) -> Federation:
        """The federation's contract without an account: reads need no wallet and no password."""
        return Federation(self.w3, self.deployment)

    @cached_property
    def store(self) -> Storage:
        spec = self.config.storage.ipfs
        if spec.startswith("embedded:"):  # a relative store folder is relative to the config file
            spec = f"embedded:{self.config.resolve(spec.removeprefix('embedded:'))}"
        return open_storage(spec, timeout_s=self.config.storage.timeout,
                            outage_s=self._outage(self.config.storage.outage_seconds))

    def _outage(self, configured: float) -> float:
        return configured if self.outage_seconds is None else self.outage_seconds

    @cached_property
    def base(self):
        """The base model (imports torch: admin commands never touch it)."""
        from ..learning.data import corpus_texts
        from ..learning.models import load_base_model

        data_cfg = self.config.data_config
        progress = logging.getLogger("fedchain.progress")
        slow = threading.Timer(SLOW_LOAD_SECONDS, progress.info, [
            f"loading base model {self.config.model.name} from {self.config.cache_dir}: the first time, it is built "
            "there (minutes on a busy machine)"])
        slow.start()
        started = time.perf_counter()
        try:
            base = load_base_model(self.config.model.name, self.config.cache_dir,
                                   corpus=lambda: corpus_texts(data_cfg, 4000), seed=data_cfg.seed)
        finally:
            slow.cancel()
        if time.perf_counter() - started > SLOW_LOAD_SECONDS:
            progress.info(f"base model {base.name} ready in {time.perf_counter() - started:.1f} s")
        return base

    @cached_property
    def trainer(self):
        """This participant's trainer: its own adapter config, the federation's client objective."""
        from ..learning.adapters import make_trainer

        trainer = make_trainer(self.base, self.rules.adapter, self.config.adapter_config, self.rules.objective)
        f = self.config.federation
        if not f.encoding and 4 * trainer.num_params > f.max_adapter_bytes:  # float32 updates would be refused
            raise ConfigError(f"{self.config.path}: [federation] max_adapter_bytes = {f.max_adapter_bytes} is below "
                              f"the {4 * trainer.num_params} bytes of a float32 {f.adapter} update of "
                              f"{self.base.name}: raise it")
        return trainer

    @cached_property
    def global_trainer(self):
        """A trainer of the global adapter config (the aggregator's initial adapter)."""
        from ..learning.adapters import make_trainer

        if self.config.adapter_config == self.rules.lora:
            return self.trainer
        return make_trainer(self.base, self.rules.adapter, self.rules.lora, self.rules.objective)

    @cached_property
    def client(self):
        from ..learning.data import build_clients

        return build_clients(self.config.data_config)[self.config.data.client]

    @cached_property
    def rules(self) -> FederationRules:
        f = self.config.federation
        try:
            return FederationRules(base_model=self.base.digest, lora=self.config.global_adapter_config,
                                   aggregation=f.aggregation, params=f.params, weighting=f.weighting,
                                   max_update_norm=f.max_update_norm, max_adapter_bytes=f.max_adapter_bytes,
                                   privacy=f.privacy, rounds=f.rounds, adapter=f.adapter, client=f.client,
                                   merge_order=f.merge_order, encoding=f.encoding,
                                   secure_aggregation=f.secure_aggregation,
                                   **({"copy_threshold": 0.0} if f.secure_aggregation else {}))
        except RulesError as exc:
            raise ConfigError(f"{self.config.path}: [federation] {exc}") from None
