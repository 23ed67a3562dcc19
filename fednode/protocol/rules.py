"""A federation's rules: everything an auditor needs to re-run verification and aggregation for a round.

The canonical JSON bytes are published to storage and their sha256 (which is also the digest of their raw CID)
is committed on-chain when a round opens.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..canonical import canonical_json
from ..learning.settings import ADAPTERS, ClientObjective, FullSettings, LoraSettings, PromptSettings, SettingsError
from ..strategies.base import RulesError
from .encoding import EncodingError, UpdateEncoding

if TYPE_CHECKING:
    from ..learning.dp_sgd import RecordDP
    from ..learning.privacy import DPSettings
    from ..strategies.base import State, Strategy
    from .secagg.masking import SecureSettings

RULES_VERSION = 2  # 2 adds merge_order, copy_threshold, max_weight_share, server_clip and the checks of declared
# sample counts and metrics documents; version 1 documents name none of these and mean LEGACY
MERGE_ORDERS = ("sha256", "submission")
LEGACY = {"merge_order": "submission", "copy_threshold": 0.0, "max_weight_share": 1.0, "server_clip": 0.0}
OPTIONAL = {"secure_aggregation": {}, "encoding": {}}  # left out of the document when off, so older documents
# keep their digest
SECURE_RULES = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # rules that need only the sum of the updates
__all__ = ["RULES_VERSION", "FederationRules", "RulesError"]


@dataclass(frozen=True)
class FederationRules:
    base_model: str                       # hex digest of the base model every update must be trained on
    lora: dict                            # the global adapter's config: LoraSettings (r, alpha, dropout,
    # target_modules), or, when adapter == "prompt", PromptSettings (num_virtual_tokens), or {} when adapter == "full"
    aggregation: str = "fedavg"           # a name in fednode.strategies.registry.STRATEGIES
    params: dict = field(default_factory=dict)  # the aggregation rule's parameters
    weighting: str = "num_samples"        # FedAvg weights: "num_samples" or "uniform"
    max_update_norm: float = 50.0         # L2 bound on (update - global start), per update
    max_adapter_bytes: int = 64 * 1024 * 1024
    privacy: dict = field(default_factory=dict)  # {} (off); hospital-level fednode.learning.privacy.DPSettings, e.g.
    # {"mechanism": "hospital", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}, or record-level
    # fednode.learning.dp_sgd.RecordDP ({"mechanism": "dp_sgd", ...})
    rounds: int = 1                       # the federation ends after this many finalized rounds
    adapter: str = "lora"                 # "lora", "prompt" (peft prompt tuning) or "full" (every weight of the base)
    client: dict = field(default_factory=dict)  # fednode.learning.settings.ClientObjective fields: what training
    # adds (FedProx, frozen A, a private orthogonal adapter); {} = plain local training
    merge_order: str = "sha256"           # the order updates are summed in: "sha256" (by file digest: the same
    # accepted updates give the same global adapter whatever order they arrived in) or "submission" (on-chain order)
    copy_threshold: float = 0.01          # an update within this fraction of its own norm of an earlier update of
    # the round (COPIED) or of the start adapter (NO_CHANGE, relative to the round's median norm) is rejected; 0 = off
    max_weight_share: float = 1.0         # no update's merge weight above this share of the total (the excess goes
    # to the others in proportion); 1 = uncapped
    server_clip: float = 0.0              # each update's delta clipped to this multiple of the round's median update
    # norm before the rule merges it; 0 = off
    secure_aggregation: dict = field(default_factory=dict)  # {} (off) or fednode.protocol.secagg.masking.
    # SecureSettings ({"threshold": 0.6, "clip": 1.0, "scale_bits": 20}): updates are masked, only their sum is seen
    encoding: dict = field(default_factory=dict)  # {} (float32 adapters) or fednode.protocol.encoding.UpdateEncoding
    # ({"dtype": "int8", "block_size": 64, "top_k": 0.0}): updates travel as encoded deltas from the start adapter
    version: int = RULES_VERSION

    def __post_init__(self):
        if self.version not in (1, RULES_VERSION):
            raise RulesError(f"rules version {self.version!r} is not one this fedchain reads (1 or {RULES_VERSION})")
        if self.version == 1 and any(getattr(self, k) != v for k, v in LEGACY.items()):
            raise RulesError(f"version 1 rules have no {', '.join(LEGACY)}")
        if self.merge_order not in MERGE_ORDERS:
            raise RulesError(f"merge_order must be one of {', '.join(MERGE_ORDERS)}, got {self.merge_order!r}")
        for name, valid, expected in (("copy_threshold", lambda v: 0 <= v < 1, "in [0, 1)"),
                                      ("max_weight_share", lambda v: 0 < v <= 1, "in (0, 1]"),
                                      ("server_clip", lambda v: 0 <= v < math.inf, "a finite number >= 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise RulesError(f"{name} must be {expected}, got {value!r}")
        if self.weighting not in ("num_samples", "uniform"):
            raise RulesError(f"weighting must be 'num_samples' or 'uniform', got {self.weighting!r}")
        if not self.max_update_norm > 0:
            raise RulesError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        if self.rounds < 1:
            raise RulesError(f"rounds must be at least 1, got {self.rounds}")
        if self.max_adapter_bytes <= 0:
            raise RulesError(f"max_adapter_bytes must be > 0, got {self.max_adapter_bytes}")
        try:
            self.adapter_settings, self.objective
        except SettingsError as exc:
            raise RulesError(str(exc)) from None
        if self.adapter != "lora" and (self.objective.freeze_a or self.objective.personalized
                                       or self.aggregation == "lora_exact"):
            raise RulesError(f"lora_exact and client freeze_a / local_rank apply to LoRA adapters, not to "
                             f"adapter = {self.adapter!r}")
        if self.version < 2 and (self.adapter == "full" or self.objective.loss != "completion"):
            raise RulesError("adapter = 'full' and client loss = 'pretrain' need rules version 2")
        self.strategy()  # an unknown rule or bad parameters are refused here, before any round opens
        if self.privacy != {}:  # validated only when set: fednode.learning.privacy imports torch
            from ..learning.privacy import PrivacyError

            try:
                self.dp, self.record_dp
            except PrivacyError as exc:
                raise RulesError(f"privacy: {exc}") from None
            if self.record_dp is not None and self.version < 2:
                raise RulesError("privacy: dp_sgd needs rules version 2")
            if self.record_dp is not None and self.adapter == "full":
                raise RulesError("privacy: dp_sgd needs per-example gradients, which full-parameter training does not "
                                 "compute (use LoRA or prompt tuning, or hospital-level DP)")
        if self.secure_aggregation != {}:
            self._check_secure()
        if self.encoding != {}:
            try:
                self.update_encoding
            except EncodingError as exc:
                raise RulesError(f"encoding: {exc}") from None
            if self.version < 2 or self.secure_aggregation != {}:
                raise RulesError("encoding needs rules version 2 and no secure_aggregation (masked updates are "
                                 "integers modulo 2^64)")

    def _check_secure(self) -> None:
        """Secure aggregation needs a rule of the mean alone and no check that reads a single update's values."""
        from .secagg.masking import SecureAggregationError

        try:
            self.secure
        except SecureAggregationError as exc:
            raise RulesError(f"secure_aggregation: {exc}") from None
        if self.version < 2:
            raise RulesError("secure_aggregation needs rules version 2")
        if self.aggregation not in SECURE_RULES:
            raise RulesError(f"secure_aggregation merges with {', '.join(SECURE_RULES)} (the rule sees only the sum), "
                             f"not {self.aggregation}")
        for name, off in (("copy_threshold", 0.0), ("max_weight_share", 1.0), ("server_clip", 0.0)):
            if getattr(self, name) != off:
                raise RulesError(f"secure_aggregation cannot apply {name} (it reads single updates): set it to {off:g}")
        if self.objective.freeze_a:
            raise RulesError("secure_aggregation cannot check client freeze_a on masked updates")

    @property
    def adapter_settings(self) -> LoraSettings | PromptSettings | FullSettings:
        """The global adapter's config as settings (validated)."""
        if self.adapter not in ADAPTERS:
            raise SettingsError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        return ADAPTERS[self.adapter].from_json(self.lora)

    @property
    def objective(self) -> ClientObjective:
        return ClientObjective.from_json(self.client)

    @property
    def dp(self) -> DPSettings | None:
        """Hospital-level DP: the noise each whole update gets before it is published; None otherwise."""
        from ..learning.privacy import DPSettings

        return DPSettings.from_rules(self.privacy)

    @property
    def record_dp(self) -> RecordDP | None:
        """Record-level DP: DP-SGD in every hospital's local training; None otherwise."""
        from ..learning.dp_sgd import RecordDP

        return RecordDP.from_rules(self.privacy)

    @property
    def secure(self) -> SecureSettings | None:
        """Secure aggregation's parameters; None when updates are sent in the clear."""
        from .secagg.masking import SecureSettings

        return SecureSettings.from_rules(self.secure_aggregation)

    @property
    def update_encoding(self) -> UpdateEncoding | None:
        """How updates travel; None for plain float32 adapters."""
        return UpdateEncoding.from_rules(self.encoding)

    @property
    def private(self) -> bool:
        """Whether every update carries DP accounting (either mechanism)."""
        return self.dp is not None or self.record_dp is not None

    def strategy(self, server_state: State | None = None) -> Strategy:
        """The aggregation object these rules name, continuing from `server_state` (the previous round's
        `strategy.server_state`; None in the first round and always for a stateless rule)."""
        from ..strategies.registry import build  # imports torch: only when a rule is applied

        return build(self.aggregation, self.params, self.weighting, self.lora, server_state, self.merge_order,
                     self.max_weight_share, self.server_clip)

    def norm_bound(self, num_params: int) -> float:
        """The L2 bound an update of `num_params` numbers must meet: max_update_norm, raised under client-side DP
        to what every honest noisy update meets: the clipped delta (<= C) plus Gaussian noise, whose norm is
        below sigma C (sqrt(d) + t) with probability at least 1 - exp(-t^2 / 2); t = 8."""
        dp = self.dp if self.privacy != {} else None
        if dp is None:
            return self.max_update_norm
        return max(self.max_update_norm, dp.clip_norm * (1 + dp.noise_multiplier * (math.sqrt(num_params) + 8)))

    def to_bytes(self) -> bytes:
        """The canonical document; a version 1 document comes out exactly as it was published (no merge_order)."""
        fields = asdict(self)
        if self.version == 1:
            for name in LEGACY:
                del fields[name]
        for name, off in OPTIONAL.items():
            if fields[name] == off:
                del fields[name]
        return canonical_json(fields)

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FederationRules":
        try:
            fields = json.loads(data)
            if isinstance(fields, dict) and fields.get("version") == 1:
                if LEGACY.keys() & fields.keys():
                    raise TypeError(f"version 1 rules name none of {', '.join(LEGACY)}")
                fields.update(LEGACY)
            return cls(**fields)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
            raise RulesError(f"not a fedchain rules document: {exc}") from None
