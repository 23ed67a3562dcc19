"""The adapter types a hospital trains (PEFT style: one trainer per adapter method): LoRA (with FFA-LoRA's frozen A
and personalized LoRA's private adapter), prompt tuning and full-parameter training; `make_trainer` picks one by
name."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from peft import PeftModel

from .dp_sgd import PrivateRun
from .models import BaseModel
from .settings import ADAPTERS, ClientObjective, FullSettings, LoraSettings, PromptSettings, TrainSettings
from .training import (ADAPTER, PLAIN, AdapterTrainer, PromptCompletion, State, TrainingError, example_losses,
                       export_params, load_params, quiet_init)

LOCAL = "local"  # the private adapter of personalized LoRA
PROMPT_KEY = "prompt_embeddings"


class LoraTrainer(AdapterTrainer):
    """LoRA on `lora.target_modules`. State keys are peft's parameter names with ".default." removed.

    Personalized (objective.local_rank > 0): a private adapter "local" (same modules, alpha and dropout, rank
    local_rank) is active together with the shared one (peft's LoRA layers sum every active adapter) in
    `train_personal` and in `evaluate`/`score` given a local_state; without one only "default" is active
    (peft's set_adapter), so evaluation sees the shared adapter alone. adapter_state and load_adapter_state are
    always the shared adapter's. freeze_a (FFA-LoRA) freezes the shared adapter's A only."""

    adapter_type = "lora"

    def __init__(self, base: BaseModel, lora: LoraSettings, objective: ClientObjective = PLAIN) -> None:
        super().__init__(base, lora, objective, "LoRA")
        self.lora = lora
        if objective.personalized:
            with quiet_init():
                self.model.add_adapter(LOCAL, dataclasses.replace(lora, r=objective.local_rank).peft_config())
        self._params = _lora_params(self.model, ADAPTER)
        self._local = _lora_params(self.model, LOCAL)

    def initial_state(self, seed: int) -> State:
        """peft's default init, seeded: A ~ kaiming-uniform(a=sqrt 5), B = 0, drawn in sorted-name order."""
        return _lora_init(self._params, seed)

    def initial_local_state(self, seed: int) -> State:
        """The private adapter's peft-default init, seeded as `initial_state`."""
        return _lora_init(self._require_local(), seed)

    def local_state(self) -> State:
        """The private adapter's weights (same keys as the shared adapter's), as float32 CPU clones."""
        return export_params(self._require_local())

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the private adapter's weights; keys and shapes must match exactly."""
        load_params(self._require_local(), state, "private adapter")

    def train_personal(self, examples: Sequence[PromptCompletion], settings: TrainSettings,
                       start_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor],
                       progress: bool | str = True, private: PrivateRun | None = None) -> tuple[State, State, dict]:
        """Train the shared adapter from `start_state` and the private one from `local_state` together (as
        `train`, plus orthogonal_lambda * the orthogonality term); returns (state, local_state, metrics)."""
        self._require_local()
        if local_state is None:
            raise TrainingError("personalized training needs the private adapter's local_state")
        self._use_local(local_state)
        metrics = self._fit(examples, settings, start_state, progress, private)
        return self.adapter_state(), self.local_state(), metrics

    @contextlib.contextmanager
    def _per_example_grads(self, params: Sequence[torch.nn.Parameter]):
        """Per-example gradients from Opacus's GradSampleModule (peft's LoRA layers are plain Linear modules, which
        it supports), hooked onto this trainer's model for the length of the context."""
        from opacus import GradSampleModule  # imports take ~2 s: only for DP-SGD

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
            sampled = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")

        def compute(input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor):
            losses = example_losses(sampled(input_ids=input_ids, attention_mask=attention).logits, labels)
            with warnings.catch_warnings():  # torch says its full backward hooks see no input needing a gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                losses.sum().backward()
            grads = [p.grad_sample.detach().clone() for p in params]
            for p in params:
                p.grad = p.grad_sample = None
            return losses.tolist(), grads

        try:
            yield compute
        finally:
            sampled._close()

    def _require_local(self) -> dict[str, torch.nn.Parameter]:
        if not self._local:
            raise TrainingError("this LoRA trainer has no private adapter (the client objective's local_rank is 0)")
        return self._local

    def _use_local(self, local_state: Mapping | None) -> None:
        if not self.objective.personalized:
            return super()._use_local(local_state)
        if local_state is not None:
            self.load_local_state(local_state)
        self.model.base_model.set_adapter(ADAPTER if local_state is None else [ADAPTER, LOCAL])

    def _trainable(self) -> list[torch.nn.Parameter]:
        shared = [p for name, p in self._params.items() if not (self.objective.freeze_a and ".lora_A." in name)]
        return shared + list(self._local.values())

    def _weights(self) -> dict[str, float]:
        return {**super()._weights(), "orthogonality": self.objective.orthogonal_lambda}

    def _terms(self, anchor: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        terms = super()._terms(anchor, dtype)
        if self._local:
            terms["orthogonality"] = sum((self._params[name].to(dtype) @ local.to(dtype).T).pow(2).sum()
                                         for name, local in self._local.items() if ".lora_A." in name)
        return terms


class PromptTrainer(AdapterTrainer):
    """Prompt tuning: `prompt.num_virtual_tokens` trained input embeddings that peft prepends to every input.
    State: {"prompt_embeddings": (num_virtual_tokens, hidden)} float32. FedProx applies; freeze_a and
    local_rank are LoRA-only."""

    adapter_type = "prompt"

    def __init__(self, base: BaseModel, prompt: PromptSettings,
                 objective: ClientObjective = PLAIN) -> None:
        if objective.freeze_a or objective.personalized:
            raise TrainingError("prompt tuning has no LoRA A matrices or private adapter: "
                                "freeze_a and local_rank apply to LoRA only")
        super().__init__(base, prompt, objective, "prompt tuning")
        self.prompt = prompt
        self._params = {PROMPT_KEY: self.model.prompt_encoder[ADAPTER].embedding.weight}

    def initial_state(self, seed: int) -> State:
        """Sampled-vocabulary init (Lester et al. 2021): the base model's input embeddings of
        num_virtual_tokens token ids drawn uniformly (with replacement) by a generator seeded with `seed`."""
        vocab = self.model.word_embeddings.weight
        rows = torch.randint(vocab.shape[0], (self.prompt.num_virtual_tokens,), generator=torch.Generator()
                             .manual_seed(seed))
        return {PROMPT_KEY: vocab.detach()[rows.to(vocab.device)].to("cpu", torch.float32).clone()}

    def _logits(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """peft prepends the virtual tokens to the sequence: their logit positions are dropped."""
        return self._model_logits(input_ids, attention)[:, self.prompt.num_virtual_tokens:]

    @contextlib.contextmanager
    def _per_example_grads(self, params: Sequence[torch.nn.Parameter]):
        """Per-example gradients by giving every example its own copy of the prompt: peft computes the prompt once
        and repeats it over the batch, so a per-sample hook (Opacus) would see one example. The forward is peft's
        own: the prompt rows before the input embeddings, their attention ones."""
        [prompt] = params
        virtual = self.prompt.num_virtual_tokens

        def compute(input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor):
            n = input_ids.shape[0]
            copies = prompt.detach().unsqueeze(0).repeat(n, 1, 1).requires_grad_(True)
            embeds = torch.cat([copies, self.model.word_embeddings(input_ids)], dim=1)
            mask = torch.cat([torch.ones(n, virtual, dtype=attention.dtype, device=attention.device), attention], 1)
            logits = self.model.base_model(inputs_embeds=embeds, attention_mask=mask).logits[:, virtual:]
            losses = example_losses(logits, labels)
            losses.sum().backward()
            return losses.tolist(), [copies.grad.detach()]

        yield compute


class FullTrainer(AdapterTrainer):
    """Full-parameter training: the "adapter" is every weight of the base model (tied weights once, under the
    name torch's named_parameters gives them), so an update is a whole model. The initial state is the base's own
    weights. FedProx applies; freeze_a, local_rank and DP-SGD (no per-example gradients for every layer type) do
    not."""

    adapter_type = "full"

    def __init__(self, base: BaseModel, settings: FullSettings, objective: ClientObjective = PLAIN) -> None:
        if objective.freeze_a or objective.personalized:
            raise TrainingError("full-parameter training has no LoRA A matrices or private adapter: "
                                "freeze_a and local_rank apply to LoRA only")
        super().__init__(base, settings, objective, "full-parameter training")
        self._params = dict(sorted(self.model.named_parameters()))

    def initial_state(self, seed: int) -> State:
        """The base model's weights (`seed` is unused: nothing is drawn)."""
        return export_params(dict(sorted(self.base.model.named_parameters())))

    def evaluate_base(self, examples: Sequence[PromptCompletion], batch_size: int = 16, max_length: int = 64) -> dict:
        """Same as `evaluate` with the base model's own weights."""
        return self._evaluate(examples, batch_size, max_length,
                              lambda ids, mask: self.base.model(input_ids=ids, attention_mask=mask).logits)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


TRAINERS: dict[str, type[AdapterTrainer]] = {cls.adapter_type: cls for cls in (LoraTrainer, PromptTrainer,
                                                                                 FullTrainer)}


def make_trainer(base: BaseModel, adapter_type: str, adapter_config: Mapping,
                 objective: ClientObjective = PLAIN) -> AdapterTrainer:
    """The trainer of adapter type "lora", "prompt" or "full" with settings from `adapter_config` (their to_json)."""
    if adapter_type not in TRAINERS:
        raise TrainingError(f"unknown adapter type {adapter_type!r} (expected one of {', '.join(TRAINERS)})")
    try:
        parsed = ADAPTERS[adapter_type].from_json(adapter_config)
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"bad {adapter_type} adapter config: {exc}") from None
    return TRAINERS[adapter_type](base, parsed, objective)


def _lora_params(model: PeftModel, adapter: str) -> dict[str, torch.nn.Parameter]:
    """`adapter`'s LoRA parameters in sorted-name order, keyed by their names without ".<adapter>."."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): param for name, param in sorted(model.named_parameters())
            if marker in name and (".lora_A." in name or ".lora_B." in name)}


def _lora_init(params: Mapping[str, torch.nn.Parameter], seed: int) -> State:
    """peft's default LoRA init, seeded: A ~ kaiming-uniform(a=sqrt 5), B = 0, drawn in `params` order."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in params.items():
        tensor = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)
        state[name] = tensor
    return state
