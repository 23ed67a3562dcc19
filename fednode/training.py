"""LoRA fine-tuning and evaluation of a base model with peft, deterministic under a seed."""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from fednode.model import BaseModel
from fednode.settings import LoraSettings, TrainSettings

ADAPTER = "default"


class TrainingError(RuntimeError):
    """Training or evaluation cannot proceed (bad adapter state, no usable examples)."""


class PromptCompletion(Protocol):
    prompt: str
    completion: str


class LoraTrainer:
    """Owns one PeftModel over a private copy of a BaseModel; reused across clients/rounds in one process."""

    def __init__(self, base: BaseModel, lora: LoraSettings) -> None:
        self.base = base
        self.lora = lora
        # peft's own random init must not disturb the caller's RNG; peft trips a transformers deprecation warning
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            try:
                self.model: PeftModel = get_peft_model(copy.deepcopy(base.model), lora.peft_config())
            except ValueError as exc:
                raise TrainingError(f"cannot attach LoRA to {base.name}: {exc}") from None
        self.model.eval()
        self._device = next(self.model.parameters()).device
        marker = f".{ADAPTER}."
        self._params = {
            name.replace(marker, "."): param
            for name, param in sorted(self.model.named_parameters())
            if marker in name and (".lora_A." in name or ".lora_B." in name)
        }
        tok = base.tokenizer
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self._eos = tok.eos_token_id
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- adapter state -------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under peft's adapter-free names, as float32 CPU clones."""
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in self._params.items()}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load LoRA weights; keys and shapes must match exactly."""
        if set(state) != set(self._params):
            missing, extra = sorted(set(self._params) - set(state)), sorted(set(state) - set(self._params))
            raise TrainingError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, param in self._params.items():
            if not isinstance(state[name], torch.Tensor):
                raise TrainingError(f"adapter entry {name} is a {type(state[name]).__name__}, not a tensor")
            got, want = tuple(state[name].shape), tuple(param.shape)
            if got != want:
                raise TrainingError(f"adapter tensor {name} has shape {got}, expected {want}")
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(state[name])

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        """peft's default init, seeded: A ~ kaiming-uniform(a=sqrt 5), B = 0, drawn in sorted-name order."""
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, param in self._params.items():
            tensor = torch.zeros(param.shape, dtype=torch.float32)
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)
            state[name] = tensor
        return state

    # --- training and evaluation ---------------------------------------------------------------

    def train(
        self,
        examples: Sequence[PromptCompletion],
        settings: TrainSettings,
        start_state: Mapping[str, torch.Tensor],
        progress: bool | str = True,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Train from `start_state` on `examples` (loss on completion tokens only); returns (state, metrics).

        metrics: train_loss (mean over the last epoch's worth of steps), steps, samples, tokens (non-padding
        input tokens processed) and seconds."""
        encoded = self._encode_all(examples, settings.max_length)
        self.load_adapter_state(start_state)
        params = list(self._params.values())
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        per_epoch = math.ceil(len(encoded) / settings.batch_size)
        gen = torch.Generator().manual_seed(settings.seed)
        losses: list[float] = []
        tokens = 0
        started = time.perf_counter()
        bar = tqdm(total=settings.steps, desc=progress if isinstance(progress, str) else "train",
                   disable=progress is False or not sys.stderr.isatty(), unit="step", leave=False)
        with bar, _deterministic(settings.seed):
            self.model.train()
            try:
                for batch in _batches(len(encoded), settings.batch_size, settings.steps, gen):
                    input_ids, attention, labels = self._collate([encoded[i] for i in batch])
                    logits = self.model(input_ids=input_ids, attention_mask=attention).logits
                    loss_sum, count = _completion_loss(logits, labels)
                    loss = loss_sum / count
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    tokens += int(attention.sum())
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            finally:
                self.model.eval()
        last = losses[-min(per_epoch, len(losses)):]
        metrics = {
            "train_loss": sum(last) / len(last),
            "steps": len(losses),
            "samples": len(examples),
            "tokens": tokens,
            "seconds": time.perf_counter() - started,
        }
        return self.adapter_state(), metrics

    def evaluate(self, examples: Sequence[PromptCompletion], state: Mapping[str, torch.Tensor],
                 batch_size: int = 16, max_length: int = 64) -> dict:
        """Token-mean completion loss and perplexity of the model with adapter `state`."""
        self.load_adapter_state(state)
        return self._evaluate(examples, batch_size, max_length)

    def evaluate_base(self, examples: Sequence[PromptCompletion], batch_size: int = 16, max_length: int = 64) -> dict:
        """Same as `evaluate` with the adapters disabled (the plain base model)."""
        with self.model.disable_adapter():
            return self._evaluate(examples, batch_size, max_length)

    def score(self, examples: Sequence[PromptCompletion], state: Mapping[str, torch.Tensor],
              batch_size: int = 16, max_length: int = 64) -> list[tuple[float, int]]:
        """Per example, with adapter `state`: (summed log-likelihood of its completion tokens, eos included, and
        their count), the same tokens `evaluate` averages its loss over."""
        self.load_adapter_state(state)
        encoded = self._encode_all(examples, max_length)
        scores: list[tuple[float, int]] = []
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                input_ids, attention, labels = self._collate(encoded[start:start + batch_size])
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
                targets = labels[:, 1:]
                mask = targets != -100
                picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores += zip((picked * mask).sum(1).tolist(), mask.sum(1).tolist())
        return scores

    def _evaluate(self, examples: Sequence[PromptCompletion], batch_size: int, max_length: int) -> dict:
        encoded = self._encode_all(examples, max_length)
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                input_ids, attention, labels = self._collate(encoded[start:start + batch_size])
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits
                loss_sum, n = _completion_loss(logits, labels)
                total += loss_sum.item()
                count += n
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}

    # --- encoding ------------------------------------------------------------------------------

    def _encode_all(self, examples: Sequence[PromptCompletion], max_length: int) -> list[tuple[list[int], int]]:
        """Each example as (token ids, number of leading prompt tokens); the completion ends in eos."""
        if not examples:
            raise TrainingError("no examples given")
        tok = self.base.tokenizer
        prompts = tok([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
        completions = tok([e.completion for e in examples], add_special_tokens=False)["input_ids"]
        encoded = []
        for prompt, completion in zip(prompts, completions, strict=True):
            completion = (completion + [self._eos])[: max_length - len(self._bos)]
            room = max_length - len(self._bos) - len(completion)
            prompt = self._bos + prompt[max(0, len(prompt) - room):]
            encoded.append((prompt + completion, len(prompt)))
        return encoded

    def _collate(self, encoded: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, ...]:
        """Right-padded (input_ids, attention_mask, labels); labels are -100 on prompt and padding."""
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        return input_ids.to(self._device), attention.to(self._device), labels.to(self._device)


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """`steps` mini-batches of indices; each epoch is a fresh seeded permutation cut into batches."""
    done = 0
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def _completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    count = int((shift_labels != -100).sum())
    if count == 0:
        raise TrainingError("no completion tokens to score (completions empty or cut off by max_length)")
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum"), count


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed dropout and prefer deterministic kernels (warn-only: CUDA's cuBLAS check would otherwise raise),
    restoring the caller's CPU RNG and flags afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
