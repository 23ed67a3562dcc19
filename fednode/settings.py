"""LoRA and local-training settings (PEFT-style dataclasses), importable without torch."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
