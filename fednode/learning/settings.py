"""LoRA and local-training settings (PEFT-style dataclasses), importable without torch."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


class SettingsError(ValueError):
    """A LoRA or training setting is out of range."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; `to_json` is the adapter part of a node's model identity."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r > 0):
            raise SettingsError(f"LoRA rank must be a positive int, got {self.r!r}")
        if not (isinstance(self.alpha, int) and self.alpha > 0):
            raise SettingsError(f"LoRA alpha must be a positive int, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise SettingsError(f"LoRA target_modules must be non-empty names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))

    def to_json(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, data: Mapping) -> LoraSettings:
        if (not isinstance(data, Mapping) or set(data) != {"r", "alpha", "dropout", "target_modules"}
                or not isinstance(data["target_modules"], list | tuple)):
            raise SettingsError(f"LoRA settings need exactly r, alpha, dropout, target_modules (a list), got {data!r}")
        return cls(data["r"], data["alpha"], float(data["dropout"]), tuple(data["target_modules"]))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainSettings:
    """One local training run: `steps` optimizer steps of AdamW over shuffled mini-batches."""

    steps: int = 30
    lr: float = 3e-3
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name, ok, expected in (("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                                   ("batch_size", self.batch_size >= 1, ">= 1"),
                                   ("max_length", self.max_length >= 2, ">= 2")):
            if not ok:
                raise SettingsError(f"{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PromptSettings:
    """Prompt tuning (peft PromptTuningConfig, random init): `num_virtual_tokens` trained input embeddings."""

    num_virtual_tokens: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.num_virtual_tokens, int) and not isinstance(self.num_virtual_tokens, bool)
                and self.num_virtual_tokens > 0):
            raise SettingsError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")

    def to_json(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens}

    @classmethod
    def from_json(cls, data: Mapping) -> PromptSettings:
        if not isinstance(data, Mapping) or set(data) != {"num_virtual_tokens"}:
            raise SettingsError(f"prompt settings need exactly num_virtual_tokens, got {data!r}")
        return cls(data["num_virtual_tokens"])

    def peft_config(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens)


@dataclass(frozen=True)
class FullSettings:
    """Full-parameter rounds: every weight of the base model trains and travels (for small bases). There is
    nothing to set, so the config is always {}."""

    def to_json(self) -> dict:
        return {}

    @classmethod
    def from_json(cls, data: Mapping) -> FullSettings:
        if not isinstance(data, Mapping) or dict(data):
            raise SettingsError(f"full-parameter training takes no adapter settings, got {data!r:.80}")
        return cls()


ADAPTERS = {"lora": LoraSettings, "prompt": PromptSettings, "full": FullSettings}  # adapter type -> its settings
LOSSES = ("completion", "pretrain")  # ClientObjective.loss


@dataclass(frozen=True)
class ClientObjective:
    """What each hospital's local training minimizes; part of the federation's rules.

    loss: "completion" (instruction tuning: cross-entropy on the completion tokens after the prompt) or "pretrain"
        (continued pre-training: causal-LM cross-entropy on every token of the example's text, prompt included);
        evaluation scores the same tokens.
    proximal_mu: FedProx, + mu/2 * ||w - w_global||^2 over the shared adapter's weights.
    freeze_a: FFA-LoRA, the LoRA A matrices stay exactly at the global adapter's; only B trains (so averaging
        B is averaging the products B @ A exactly).
    local_rank / orthogonal_lambda: personalized LoRA, a private adapter of rank local_rank (0 = off) trains
        beside the shared one, + lambda * sum over modules ||A_global @ A_local^T||_F^2; only the shared adapter
        is published, evaluation uses both."""

    loss: str = "completion"
    proximal_mu: float = 0.0
    freeze_a: bool = False
    local_rank: int = 0
    orthogonal_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise SettingsError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("proximal_mu", "orthogonal_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or value == float("inf"):
                raise SettingsError(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.freeze_a, bool):
            raise SettingsError(f"freeze_a must be true or false, got {self.freeze_a!r}")
        if isinstance(self.local_rank, bool) or not isinstance(self.local_rank, int) or self.local_rank < 0:
            raise SettingsError(f"local_rank must be an int >= 0, got {self.local_rank!r}")
        if self.orthogonal_lambda and not self.local_rank:
            raise SettingsError("orthogonal_lambda needs a private adapter: set local_rank > 0")

    @property
    def personalized(self) -> bool:
        return self.local_rank > 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != getattr(ClientObjective, k)}

    @classmethod
    def from_json(cls, data: Mapping) -> ClientObjective:
        if not isinstance(data, Mapping):
            raise SettingsError(f"client objective must be a table, got {data!r:.80}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise SettingsError(f"client objective has no setting {unknown[0]!r}; known: "
                                f"{', '.join(f.name for f in fields(cls))}")
        return cls(**data)
