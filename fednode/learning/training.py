"""Local adapter training and evaluation with peft, deterministic under a seed: the trainer base class with the
training loop, evaluation and scoring; the adapter types (LoRA, prompt tuning) are in `fednode.learning.adapters`.
A client objective adds FedProx's proximal term, FFA-LoRA's frozen A or a private orthogonal LoRA adapter."""
from __future__ import annotations

import abc
import contextlib
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from .dp_sgd import PrivateRun
from .models import BaseModel
from .settings import ClientObjective, FullSettings, LoraSettings, PromptSettings, TrainSettings

ADAPTER = "default"  # peft's name of the shared (published) adapter
PLAIN = ClientObjective()  # the plain completion loss

State = dict[str, torch.Tensor]
Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingError(RuntimeError):
    """Training or evaluation cannot proceed (bad adapter state, no usable examples)."""


class PromptCompletion(Protocol):
    prompt: str
    completion: str


class AdapterTrainer(abc.ABC):
    """Owns one PeftModel over a private copy of a BaseModel; reused across clients/rounds in one process.

    Subclasses attach their adapter (`settings.peft_config()`), set `_params` (the shared adapter's parameters
    under their state keys) and may override the hooks `_logits`, `_trainable`, `_weights`/`_terms` and
    `_use_local`."""

    adapter_type: str

    def __init__(self, base: BaseModel, settings: LoraSettings | PromptSettings | FullSettings,
                 objective: ClientObjective, label: str) -> None:
        self.base = base
        self.settings = settings
        self.objective = objective
        with quiet_init():
            try:
                self.model: PeftModel = self._wrap(copy.deepcopy(base.model))
            except ValueError as exc:
                raise TrainingError(f"cannot attach {label} to {base.name}: {exc}") from None
        self.model.eval()
        self._params: dict[str, torch.nn.Parameter] = {}
        self._device = next(self.model.parameters()).device
        tok = base.tokenizer
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self._eos = tok.eos_token_id
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def adapter_config(self) -> dict:
        """The adapter's settings as JSON (the adapter part of a node's model identity)."""
        return self.settings.to_json()

    @property
    def num_params(self) -> int:
        """Elements of the shared adapter's state (every weight of the model for full-parameter training)."""
        return sum(p.numel() for p in self._params.values())

    # --- adapter state -------------------------------------------------------------------------

    def adapter_state(self) -> State:
        """The shared adapter's weights under their state keys, as float32 CPU clones."""
        return export_params(self._params)

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the shared adapter's weights; keys and shapes must match exactly."""
        load_params(self._params, state, "adapter")

    @abc.abstractmethod
    def initial_state(self, seed: int) -> State:
        """A fresh shared adapter, deterministic in `seed`."""

    # --- training and evaluation ---------------------------------------------------------------

    def train(self, examples: Sequence[PromptCompletion], settings: TrainSettings,
              start_state: Mapping[str, torch.Tensor], progress: bool | str = True,
              private: PrivateRun | None = None) -> tuple[State, dict]:
        """Train from `start_state` on `examples` (loss on completion tokens only, plus the objective's terms);
        returns (state, metrics).

        metrics: train_loss (completion loss, mean over the last epoch's worth of steps), steps, samples, tokens
        (non-padding input tokens processed), seconds, and per objective term its final unweighted value:
        proximal (sum ||w - w_start||^2 over the shared adapter) when proximal_mu > 0, orthogonality (sum over
        modules ||A_shared @ A_local^T||_F^2) when personalized. With `private`, every step is a DP-SGD step
        (fednode.learning.dp_sgd)."""
        if self.objective.personalized:
            raise TrainingError("a personalized trainer also trains its private adapter: use train_personal")
        metrics = self._fit(examples, settings, start_state, progress, private)
        return self.adapter_state(), metrics

    def evaluate(self, examples: Sequence[PromptCompletion], state: Mapping[str, torch.Tensor],
                 batch_size: int = 16, max_length: int = 64, local_state: Mapping | None = None) -> dict:
        """Token-mean completion loss and perplexity of the model with adapter `state` (and, personalized, the
        private adapter `local_state`; without it only the shared adapter is active)."""
        self.load_adapter_state(state)
        self._use_local(local_state)
        return self._evaluate(examples, batch_size, max_length, self._logits)

    def evaluate_base(self, examples: Sequence[PromptCompletion], batch_size: int = 16, max_length: int = 64) -> dict:
        """Same as `evaluate` with the adapters disabled (the plain base model)."""
        with self.model.disable_adapter():
            return self._evaluate(examples, batch_size, max_length, self._model_logits)

    def score(self, examples: Sequence[PromptCompletion], state: Mapping[str, torch.Tensor],
              batch_size: int = 16, max_length: int = 64,
              local_state: Mapping | None = None) -> list[tuple[float, int]]:
        """Per example, with adapter `state` (and `local_state` as in `evaluate`): (summed log-likelihood of its
        completion tokens, eos included, and their count), the same tokens `evaluate` averages its loss over."""
        self.load_adapter_state(state)
        self._use_local(local_state)
        scores: list[tuple[float, int]] = []
        for logits, labels in self._batched_logits(examples, batch_size, max_length, self._logits):
            targets = labels[:, 1:]
            mask = targets != -100
            picked = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores += zip((picked * mask).sum(1).tolist(), mask.sum(1).tolist())
        return scores

    def _fit(self, examples: Sequence[PromptCompletion], settings: TrainSettings,
             start_state: Mapping[str, torch.Tensor], progress: bool | str, private: PrivateRun | None = None) -> dict:
        """The training loop over the active adapters; the caller reads the trained state back. A private run
        samples its own batches and replaces each step's gradient of the completion loss by the noisy sum of
        clipped per-example gradients; the objective's terms depend on the weights alone and are added after."""
        encoded = self._encode_all(examples, settings.max_length)
        self.load_adapter_state(start_state)
        # the start weights, for FedProx's term only (a full-parameter model would be copied for nothing)
        anchor = [p.detach().clone() for p in self._params.values()] if self.objective.proximal_mu else []
        params = self._trainable()
        trainable = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        weights = {name: w for name, w in self._weights().items() if w > 0}
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        per_epoch = math.ceil(len(encoded) / settings.batch_size)
        gen = torch.Generator().manual_seed(settings.seed)
        losses: list[float] = []
        tokens = 0
        started = time.perf_counter()
        bar = tqdm(total=settings.steps, desc=progress if isinstance(progress, str) else "train",
                   disable=progress is False or not sys.stderr.isatty(), unit="step", leave=False)
        batches = private.batches(len(encoded), settings.steps) if private else \
            _batches(len(encoded), settings.batch_size, settings.steps, gen)
        with bar, _deterministic(settings.seed), (self._per_example_grads(params) if private else
                                                  contextlib.nullcontext()) as per_example:
            self.model.train()
            try:
                for batch in batches:
                    input_ids, attention, labels = self._collate([encoded[i] for i in batch]) if batch else (None,) * 3
                    if private:
                        step_losses, grads = per_example(input_ids, attention, labels) if batch else ([], [])
                        losses += step_losses
                        for p, g in zip(params, private.noisy_gradient(grads, [p.shape for p in params])):
                            p.grad = g.to(p.dtype)
                        loss = None
                    else:
                        loss_sum, count = _completion_loss(self._logits(input_ids, attention), labels)
                        loss = loss_sum / count
                        losses.append(loss.item())
                    if weights:
                        terms = self._terms(anchor, torch.float32)
                        extra = sum(w * terms[name] for name, w in weights.items())
                        loss = extra if loss is None else loss + extra
                    if loss is not None:
                        loss.backward()
                    if not private:
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    tokens += int(attention.sum()) if batch else 0
                    bar.update()
                    if losses:
                        bar.set_postfix(loss=f"{losses[-1]:.3f}")
            finally:
                self.model.eval()
        last = losses[-min(per_epoch, len(losses)):] if not private else losses[-len(encoded):]
        with torch.no_grad():
            terms = {name: t.item() for name, t in self._terms(anchor, torch.float64).items()}
        return {"train_loss": sum(last) / len(last) if last else math.nan, "steps": settings.steps,
                "samples": len(examples), "tokens": tokens, "seconds": time.perf_counter() - started, **terms}

    def _per_example_grads(self, params: Sequence[torch.nn.Parameter]):
        """A context giving `(input_ids, attention, labels) -> (per-example completion losses, one (batch, *shape)
        gradient tensor per parameter of `params`)`, each example's gradient that of its own token-mean loss."""
        raise TrainingError(f"this {self.adapter_type} trainer has no per-example gradients for DP-SGD")

    def _evaluate(self, examples: Sequence[PromptCompletion], batch_size: int, max_length: int,
                  logits_of: Logits) -> dict:
        total, count = 0.0, 0
        for logits, labels in self._batched_logits(examples, batch_size, max_length, logits_of):
            loss_sum, n = _completion_loss(logits, labels)
            total += loss_sum.item()
            count += n
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}

    def _batched_logits(self, examples: Sequence[PromptCompletion], batch_size: int, max_length: int,
                        logits_of: Logits) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) per batch of `examples` in order, without gradients."""
        encoded = self._encode_all(examples, max_length)
        for start in range(0, len(encoded), batch_size):
            input_ids, attention, labels = self._collate(encoded[start:start + batch_size])
            with torch.no_grad():
                logits = logits_of(input_ids, attention)
            yield logits, labels

    # --- hooks ---------------------------------------------------------------------------------

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The trainer's model around its private copy of the base: peft's, with the adapter attached."""
        return get_peft_model(model, self.settings.peft_config())

    def _model_logits(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention).logits

    def _logits(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Logits, one per input position, with the adapter on."""
        return self._model_logits(input_ids, attention)

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (all others get no gradient)."""
        return list(self._params.values())

    def _weights(self) -> dict[str, float]:
        """Each objective term's factor in the training loss."""
        return {"proximal": self.objective.proximal_mu / 2}

    def _terms(self, anchor: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The objective's unweighted terms in use, computed in `dtype`; `anchor` is the start of the shared
        adapter's parameters, in `_params` order."""
        if not self.objective.proximal_mu:
            return {}
        return {"proximal": sum((p.to(dtype) - a.to(dtype)).pow(2).sum() for p, a in zip(self._params.values(),
                                                                                          anchor))}

    def _use_local(self, local_state: Mapping | None) -> None:
        """Load and activate the private adapter `local_state` (None: the shared adapter alone)."""
        if local_state is not None:
            raise TrainingError(f"this {self.adapter_type} trainer has no private adapter to load a local_state into")

    # --- encoding ------------------------------------------------------------------------------

    def _encode_all(self, examples: Sequence[PromptCompletion], max_length: int) -> list[tuple[list[int], int]]:
        """Each example as (token ids, number of leading unscored tokens); the completion ends in eos. The
        completion loss leaves bos and the prompt unscored, the pretrain loss only bos (which nothing predicts)."""
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
            encoded.append((prompt + completion, len(prompt) if self.objective.loss == "completion" else 0))
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


def export_params(params: Mapping[str, torch.nn.Parameter]) -> State:
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in params.items()}


def load_params(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `params`; keys and shapes must match exactly."""
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise TrainingError(f"{what} keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():
        if not isinstance(state[name], torch.Tensor):
            raise TrainingError(f"{what} entry {name} is a {type(state[name]).__name__}, not a tensor")
        got, want = tuple(state[name].shape), tuple(param.shape)
        if got != want:
            raise TrainingError(f"{what} tensor {name} has shape {got}, expected {want}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


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


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's own token-mean completion loss, shape (batch,): what DP-SGD bounds per record."""
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=-100, reduction="none").view(targets.shape)
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def _completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    count = int((shift_labels != -100).sum())
    if count == 0:
        raise TrainingError("no completion tokens to score (completions empty or cut off by max_length)")
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum"), count


@contextlib.contextmanager
def quiet_init() -> Iterator[None]:
    """peft's own random adapter init must not disturb the caller's RNG; peft trips a transformers deprecation
    warning."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


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
