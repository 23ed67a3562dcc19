"""A hospital node: joins with its wallet, then each round fetches the global adapter, trains on its own data,
packages, publishes and anchors its update. Patient text never leaves this object."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from chain.clients import Federation, RoundState
from chain.signing import UpdateFields
from chain.transactions import Receipt

from ..learning.data import ClientData
from ..learning.lora_math import truncate
from ..learning.models import model_identity
from ..learning.dp_sgd import PrivateRun
from ..learning.privacy import noise_seed, privatize
from ..learning.settings import TrainSettings
from ..learning.training import AdapterTrainer
from ..storage import Storage
from ..timing import Stopwatch
from .documents import ModelCard, fetch_document, read_cards
from .encoding import METADATA_KEY as ENCODING_KEY
from .ledger import Ledger, RoundRecord
from .packaging import SHARES_KEY, WEIGHT_KEY, adapter_metadata, pack_adapter
from .private_adapters import PrivateAdapters
from .publish import fetch_adapter, fetch_rules, publish_bytes, publish_json
from .relay import Handover, hand_over
from .rules import FederationRules
from .secagg import keys as secagg_keys
from .secagg.masking import merge_weight, quantize, to_state
from .secagg.shares import MAX_RAW_DOCUMENT, SurvivorsDocument, fetch_share_document, mask, reveal


class NodeError(RuntimeError):
    """This node cannot take part in a round as the chain records it (e.g. no registered key for a masked one)."""


@dataclass(frozen=True)
class LocalUpdate:
    round_id: int
    data: bytes
    num_samples: int
    metrics: dict


@dataclass(frozen=True)
class SubmittedUpdate:
    round_id: int
    cid: str
    cid_digest: bytes
    file_sha256: bytes
    num_samples: int
    metrics: dict
    metrics_cid: str
    receipt: Receipt | None  # None on the relay path: the aggregator's batch records it
    signed_cid: str | None = None  # on the relay path, the signed update handed to the aggregator
    size: int = 0  # bytes of the update file (what the hospital uploads besides its small documents)


class Node:
    def __init__(self, fed: Federation, store: Storage, trainer: AdapterTrainer, client: ClientData,
                 rules: FederationRules, train: TrainSettings, stopwatch: Stopwatch | None = None,
                 private_dir: Path | None = None, adapter_config: dict | None = None, relay: Handover | None = None,
                 log=print):
        """`relay` hands signed updates to the aggregator instead of sending them (no ether needed). `private_dir`
        keeps the hospital's private adapter (personalized rules) between rounds and restarts;
        None keeps it in memory. `adapter_config` is this node's own (default: its trainer's; a node that only
        joins may have no trainer). `log` says what a hospital's operator must know (unusable share bundles)."""
        self.log = log
        self.fed = fed
        self.store = store
        self.trainer = trainer
        self.client = client
        self.rules = rules
        self.train_settings = train
        self.federation_id = fed.deployment.federation_id
        self.stopwatch = stopwatch or Stopwatch()
        self._evaluations: dict[bytes, dict] = {}
        self._round_rules: dict[bytes, FederationRules] = {}
        # this node's own adapter config (its rank may be below the global one under lora_exact)
        self.adapter_config = adapter_config or trainer.adapter_config
        self.private = PrivateAdapters(private_dir, self.federation_id, fed.address)
        self.ledger = Ledger(fed)
        self._cards: dict[bytes, ModelCard | str] = {}
        self._keys: dict[int, dict[str, bytes]] = {}  # masked rounds' participants (fixed when a round opens)
        self.relay = relay

    @property
    def address(self) -> str:
        return self.fed.address

    @property
    def model_id(self) -> bytes:
        return model_identity(self.rules.base_model, self.adapter_config)

    def join(self, card: dict | None = None) -> Receipt:
        """Register this node's wallet and model identity; the model card goes to storage, its digest on-chain. The
        card registers the node's secure-aggregation key, signed by its wallet."""
        card = {"node": self.address, "hospital": self.client.name, "base_model": self.rules.base_model,
                "adapter": self.adapter_config, "dataset_size": len(self.client.train),
                **secagg_keys.registration(self.fed.sender.account, self.federation_id), **(card or {})}
        with self.stopwatch("storage"):
            _, card_digest = publish_json(self.store, card)
        with self.stopwatch("chain"):
            return self.fed.join(self.model_id, card_digest)

    def has_submitted(self, round_id: int) -> bool:
        with self.stopwatch("chain"):
            return self.fed.submission_commitment(round_id, self.address) != bytes(32)

    def global_state(self, rec: RoundRecord) -> dict:
        """The adapter a round starts from, fetched and checked against the on-chain digests."""
        return self.global_state_from(rec.base_cid_digest, rec.base_sha256)

    def global_state_from(self, cid_digest: bytes, sha256: bytes) -> dict:
        with self.stopwatch("storage"):
            state, _ = fetch_adapter(self.store, cid_digest, sha256, self.rules.max_adapter_bytes,
                                     self.rules.base_model)
        return state

    def round_rules(self, rec: RoundRecord) -> FederationRules:
        """The rules document the round committed to on-chain (fetched once per digest)."""
        if rec.rules_digest not in self._round_rules:
            with self.stopwatch("storage"):
                self._round_rules[rec.rules_digest] = fetch_rules(self.store, rec.rules_digest)
        return self._round_rules[rec.rules_digest]

    def start_state(self, global_state: dict) -> dict:
        """This node's start adapter from a global one: the global adapter cut to this node's rank."""
        return truncate(global_state, self.rules.lora, self.adapter_config)

    def evaluate(self, cid_digest: bytes, state: dict) -> dict:
        """Loss and perplexity of a global adapter (cut to this node's rank) on this hospital's held-out split
        (cached per adapter)."""
        if cid_digest not in self._evaluations:
            with self.stopwatch("evaluation"):
                self._evaluations[cid_digest] = self.trainer.evaluate(self.client.eval, self.start_state(state))
        return self._evaluations[cid_digest]

    def personal_state(self, round_id: int) -> dict:
        """The private adapter this node enters round `round_id` with (its newest from an earlier round, else the
        initial one, seeded by the node's address)."""
        saved = self.private.latest_before(round_id)
        return saved if saved is not None else self.trainer.initial_local_state(int(self.address, 16) % 2**31)

    def train(self, rec: RoundRecord) -> LocalUpdate:
        """Train from the round's global adapter on local data and package the result canonically; when the
        round's rules ask for DP, the update is clipped and noised first and its metrics carry the accounting.
        Under personalized rules the private adapter trains alongside and is kept, never published."""
        global_state = self.global_state(rec)
        start, start_eval = self.start_state(global_state), self.evaluate(rec.base_cid_digest, global_state)
        settings = replace(self.train_settings, seed=self.train_settings.seed + rec.round_id)
        rules = self.round_rules(rec)
        private = self.private_run(rec, rules)
        if private is not None:  # the rules fix the steps and the batch: the accounting depends on them
            settings = replace(settings, steps=private.settings.steps, batch_size=private.settings.batch_size)
        progress = f"{self.client.name} round {rec.round_id}"
        personal = {}
        if self.trainer.objective.personalized:
            local = self.personal_state(rec.round_id)
            with self.stopwatch("evaluation"):
                personal["personal_eval_loss"] = self.trainer.evaluate(self.client.eval, start,
                                                                       local_state=local)["loss"]
            with self.stopwatch("training"):
                state, local, stats = self.trainer.train_personal(self.client.train, settings, start, local,
                                                                  progress=progress, private=private)
            self.private.save(rec.round_id, local)
            personal["orthogonality"] = stats["orthogonality"]
        else:
            with self.stopwatch("training"):
                state, stats = self.trainer.train(self.client.train, settings, start, progress=progress,
                                                  private=private)
        metrics = {"round": rec.round_id, "node": self.address, "hospital": self.client.name,
                   "train_loss": stats["train_loss"], "steps": stats["steps"], "samples": stats["samples"],
                   "tokens": stats["tokens"], "global_eval_loss": start_eval["loss"],
                   "global_eval_perplexity": start_eval["perplexity"], **personal}
        if private is not None:
            metrics["privacy"] = private.accounting()
        dp = rules.dp
        if dp is not None:
            with self.stopwatch("privacy"):
                state, metrics["privacy"] = privatize(state, start, dp, self.fed.sender.account, self.federation_id,
                                                      rec.round_id)
        if rules.secure is not None:
            return LocalUpdate(rec.round_id, self.masked(rec, rules, start, state), len(self.client.train), metrics)
        encoding = rules.update_encoding
        extra = None
        if encoding is not None:  # the delta from the start adapter, encoded as the rules say
            state, extra = encoding.encode(state, start), {ENCODING_KEY: encoding.declared()}
        meta = adapter_metadata(self.federation_id, rec.round_id, self.address, self.rules.base_model,
                                self.adapter_config, "update", extra)
        return LocalUpdate(rec.round_id, pack_adapter(state, meta), len(self.client.train), metrics)

    def round_keys(self, rec: RoundRecord) -> dict[str, bytes]:
        """The participants of a masked round (active when it opened, with a registered key) and their keys."""
        if rec.round_id in self._keys:
            return self._keys[rec.round_id]
        with self.stopwatch("chain"):
            history = self.ledger.refresh()
        with self.stopwatch("storage"):
            cards = read_cards(self.store, history.participants, self._cards)
        keys, _ = secagg_keys.participant_keys(history.participants, cards, self.federation_id, rec.opened_block)
        if self.address not in keys:
            raise NodeError(f"round {rec.round_id} is securely aggregated, but this node was no participant with a "
                            f"registered key when it opened")
        self._keys[rec.round_id] = keys
        return keys

    def masked(self, rec: RoundRecord, rules: FederationRules, start: dict, state: dict) -> bytes:
        """The update's bytes under secure aggregation: its quantized weighted delta plus the self mask and a pair
        mask with every other participant, modulo 2^64; the share document of those masks' seeds is published
        first and named in the metadata."""
        keys, secure = self.round_keys(rec), rules.secure
        with self.stopwatch("masking"):
            weight = merge_weight(rules.weighting, len(self.client.train))
            values, doc = mask(self.fed.sender.account, self.federation_id, rec.round_id, keys,
                               quantize(state, start, secure, weight), secure.shares_needed(len(keys)))
        with self.stopwatch("storage"):
            shares_cid, _ = publish_json(self.store, doc.model_dump())
        meta = adapter_metadata(self.federation_id, rec.round_id, self.address, self.rules.base_model,
                                self.adapter_config, "masked_update", {SHARES_KEY: shares_cid, WEIGHT_KEY: str(weight)})
        return pack_adapter(to_state(values, start), meta)

    def reveal(self, rec: RoundRecord) -> Receipt | None:
        """Secure aggregation: once the aggregator has fixed an open round's survivors, publish the shares this node
        holds that remove their masks, and only those (once; None when there is nothing to do)."""
        if rec.unmask is None or rec.state != RoundState.OPEN:
            return None
        with self.stopwatch("chain"):
            if self.fed.reveal_commitment(rec.round_id, self.address) != bytes(32):
                return None
        keys = self.round_keys(rec)
        digest = rec.unmask.survivors_digest
        with self.stopwatch("storage"):
            survivors = fetch_document(self.store, digest, SurvivorsDocument, MAX_RAW_DOCUMENT)
            submitted = {s.node for s in rec.submissions}
            if (survivors.federation.lower(), survivors.round) != (self.federation_id.lower(), rec.round_id) \
                    or not set(survivors.survivors) <= submitted:
                raise NodeError(f"round {rec.round_id}: the survivors document names another round or nodes that "
                                f"did not submit; no shares revealed")
            docs = {dealer: fetch_share_document(self.store, cid) for dealer, cid in survivors.survivors.items()}
        with self.stopwatch("masking"):
            doc, problems = reveal(secagg_keys.agreement_key(self.fed.sender.account, self.federation_id),
                                   self.address, survivors, digest, docs, keys)
        for problem in problems:
            self.log(f"round {rec.round_id}: {problem}")
        with self.stopwatch("storage"):
            _, reveal_digest = publish_json(self.store, doc.model_dump())
        with self.stopwatch("chain"):
            return self.fed.reveal_shares(rec.round_id, reveal_digest)

    def private_run(self, rec: RoundRecord, rules: FederationRules) -> PrivateRun | None:
        """Under record-level DP, this round's DP-SGD run: the secret seed derived from the wallet, the rounds this
        node already spent privacy in (PrivacyError once the rules' budget is spent)."""
        dp = rules.record_dp
        if dp is None:
            return None
        with self.stopwatch("chain"):
            done = sum(self.has_submitted(r) for r in range(1, rec.round_id))
        seed = noise_seed(dp.noise_seed, self.fed.sender.account, self.federation_id, rec.round_id)
        return PrivateRun(dp, len(self.client.train), rules.rounds, seed, done)

    def publish_and_submit(self, round_id: int, data: bytes, num_samples: int, metrics: dict) -> SubmittedUpdate:
        """Publish the update's bytes and its metrics, then anchor both digests on-chain, or sign them and hand them
        to the relay."""
        with self.stopwatch("storage"):
            cid, cid_digest, sha = publish_bytes(self.store, data)
            metrics_cid, metrics_digest = publish_json(self.store, metrics)
        if self.relay is not None:
            with self.stopwatch("storage"):
                signed_cid = hand_over(self.fed, self.store, UpdateFields(round_id, cid_digest, sha, num_samples,
                                                                          metrics_digest), self.relay)
            return SubmittedUpdate(round_id, cid, cid_digest, sha, num_samples, metrics, metrics_cid, None, signed_cid,
                                   size=len(data))
        with self.stopwatch("chain"):
            receipt = self.fed.submit_update(round_id, cid_digest, sha, num_samples, metrics_digest)
        return SubmittedUpdate(round_id, cid, cid_digest, sha, num_samples, metrics, metrics_cid, receipt,
                               size=len(data))

    def participate(self, rec: RoundRecord) -> SubmittedUpdate | None:
        """Train, publish and submit for an open round; None if this node already submitted to it (a restart)."""
        if rec.state != RoundState.OPEN or self.has_submitted(rec.round_id):
            return None
        update = self.train(rec)
        return self.publish_and_submit(rec.round_id, update.data, update.num_samples, update.metrics)
