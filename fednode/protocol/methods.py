"""Named federated methods: each is a set of federation rules (aggregation rule, client objective, privacy,
adapter type) plus the adapter config of every hospital. The demo, the quality benchmark and the tests build
their federations from these, so a method's name means the same rules everywhere."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..learning.settings import FullSettings, LoraSettings, PromptSettings, TrainSettings
from .rules import FederationRules


class MethodError(ValueError):
    """An unknown method name."""


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    aggregation: str = "fedavg"
    params: dict = field(default_factory=dict)
    client: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    adapter: str = "lora"
    client_ranks: tuple[int, ...] = ()  # hospital i trains LoRA rank client_ranks[i % len]; () = the global rank
    server_clip: float = 0.0            # the rules' server-side clipping (multiple of the round's median norm)
    encoding: dict = field(default_factory=dict)            # the rules' update encoding ({} = float32)
    secure_aggregation: dict = field(default_factory=dict)  # the rules' secure aggregation ({} = off)
    lr: float = 0.0                     # the learning rate hospitals train with; 0 = the run's own TrainSettings.lr

    def global_config(self, lora: LoraSettings, prompt: PromptSettings) -> dict:
        return {"lora": lora, "prompt": prompt, "full": FullSettings()}[self.adapter].to_json()

    def train_settings(self, train: TrainSettings) -> TrainSettings:
        """`train` with the method's own learning rate, if it sets one."""
        return replace(train, lr=self.lr) if self.lr else train

    def client_config(self, index: int, lora: LoraSettings, prompt: PromptSettings) -> dict:
        """Hospital `index`'s own adapter config."""
        if self.adapter == "lora" and self.client_ranks:
            return replace(lora, r=min(lora.r, self.client_ranks[index % len(self.client_ranks)])).to_json()
        return self.global_config(lora, prompt)

    def rules(self, base_digest: str, lora: LoraSettings, prompt: PromptSettings, train: TrainSettings | None = None,
              **overrides) -> FederationRules:
        """The method's rules; record-level DP takes its steps and expected batch per round from `train`."""
        privacy = self.privacy
        if privacy.get("mechanism") == "dp_sgd":
            train = train or TrainSettings()
            privacy = {**privacy, "steps": train.steps, "batch_size": train.batch_size}
        secure = {"secure_aggregation": self.secure_aggregation, "copy_threshold": 0.0} if self.secure_aggregation \
            else {}
        return FederationRules(base_model=base_digest, lora=self.global_config(lora, prompt),
                               aggregation=self.aggregation, params=self.params, client=self.client,
                               privacy=privacy, adapter=self.adapter, server_clip=self.server_clip,
                               encoding=self.encoding, **secure, **overrides)

    @property
    def min_clients(self) -> int:
        """The fewest hospitals a round of this method needs (Krum: 2f + 3)."""
        return self.rules("00" * 32, LoraSettings(), PromptSettings()).strategy().min_updates


def _dp(noise_multiplier: float) -> Method:
    return Method(f"dp-{noise_multiplier:g}", f"FedAvg of hospital-level DP updates (the whole update clipped to 1, "
                                              f"sigma {noise_multiplier:g})",
                  privacy={"mechanism": "hospital", "clip_norm": 1.0, "noise_multiplier": noise_multiplier,
                           "delta": 1e-5})


def _dp_sgd(target_epsilon: float) -> Method:
    return Method(f"dp_sgd-{target_epsilon:g}", f"FedAvg of record-level DP-SGD training (per-example clip 1, noise "
                                                f"calibrated for epsilon {target_epsilon:g} at delta 1e-5 over the "
                                                f"federation)",
                  privacy={"mechanism": "dp_sgd", "max_grad_norm": 1.0, "target_epsilon": target_epsilon,
                           "delta": 1e-5})


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedavg", "FedAvg, LoRA A and B averaged separately"),
    Method("fedprox", "FedAvg with FedProx's proximal term (mu 0.1) in local training",
           client={"proximal_mu": 0.1}),
    Method("fedavgm", "server momentum 0.9 (FedAvgM)", aggregation="fedavgm", params={"server_momentum": 0.9}),
    Method("fedadam", "FedAdam server optimizer (eta 0.01, tau 1e-3)", aggregation="fedadam",
           params={"eta": 1e-2, "tau": 1e-3}),
    Method("fedyogi", "FedYogi server optimizer (eta 0.01, tau 1e-3)", aggregation="fedyogi",
           params={"eta": 1e-2, "tau": 1e-3}),
    Method("lora_exact", "exact LoRA aggregation: mean of the products B@A, re-factored to rank r by SVD",
           aggregation="lora_exact"),
    Method("ffa", "FFA-LoRA: A frozen at the shared init, only B trains (averaging B is exact)",
           client={"freeze_a": True}),
    Method("hetero_ranks", "hospitals with LoRA ranks r, r/2, r/4 merged exactly (lora_exact)",
           aggregation="lora_exact", client_ranks=(8, 4, 2)),
    Method("personalized", "shared LoRA + private rank-4 LoRA per hospital, orthogonality lambda 1",
           client={"local_rank": 4, "orthogonal_lambda": 1.0}),
    Method("prompt", "federated prompt tuning (peft, 8 virtual tokens), FedAvg", adapter="prompt"),
    Method("full", "full-parameter FedAvg: every weight of the base trains and travels (lr 3e-4)", adapter="full",
           lr=3e-4),
    Method("pretrain", "federated continued pre-training: full-parameter FedAvg of causal-LM training on every token "
                       "of the hospitals' text (lr 3e-4)", adapter="full", client={"loss": "pretrain"}, lr=3e-4),
    _dp(0.01), _dp(0.1), _dp(1.0), _dp_sgd(1.0), _dp_sgd(3.0), _dp_sgd(8.0),
    Method("median", "coordinate-wise median of the updates (robust to a minority of poisoned updates)",
           aggregation="median"),
    Method("trimmed_mean", "coordinate-wise mean without the 20% smallest and 20% largest values",
           aggregation="trimmed_mean", params={"beta": 0.2}),
    Method("krum", "Krum (f = 1): the update closest to its n - f - 2 nearest others becomes the global adapter",
           aggregation="krum", params={"f": 1}),
    Method("multi_krum", "Multi-Krum (f = 1): FedAvg of the 3 updates with the best Krum scores",
           aggregation="multi_krum", params={"f": 1, "m": 3}),
    Method("clipped_fedavg", "FedAvg of the updates clipped server-side to the round's median update norm",
           server_clip=1.0),
    Method("fp16", "FedAvg of updates sent as float16 deltas", encoding={"dtype": "float16"}),
    Method("bf16", "FedAvg of updates sent as bfloat16 deltas", encoding={"dtype": "bfloat16"}),
    Method("int8", "FedAvg of updates sent as int8 deltas, one float32 scale per 128 values",
           encoding={"dtype": "int8"}),
    Method("int8-top10", "FedAvg of updates sent as the 10% largest deltas per tensor, int8 with 128-value scales",
           encoding={"dtype": "int8", "top_k": 0.1}),
    Method("secagg", "FedAvg under secure aggregation: masked updates, only their sum is unmasked (threshold 0.6, "
                     "clip 1, 2^-20 fixed point)",
           secure_aggregation={"threshold": 0.6, "clip": 1.0, "scale_bits": 20}),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
