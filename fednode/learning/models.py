"""Base language models: a tiny locally-built Llama (tests, demo) and SmolLM2-135M."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from ..canonical import canonical_json, le_bytes

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


class ModelError(ValueError):
    """A base model cannot be provided as asked."""


@dataclass
class BaseModel:
    """A frozen base model, its tokenizer and its identity (hex sha256)."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    digest: str


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pretraining recipe of the tiny Llama."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    pretrain_steps: int = 200
    pretrain_batch: int = 16
    pretrain_block: int = 64
    pretrain_lr: float = 3e-3

    def llama_config(self, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )


TINY = TinySpec()


def load_base_model(
    name: str,
    cache_dir: Path,
    corpus: Callable[[], list[str]] | None = None,
    seed: int = 0,
) -> BaseModel:
    """Load base model `name` ("tiny" or "smollm2"), building or reading it under `cache_dir`."""
    if name == "tiny":
        if corpus is None:
            raise ModelError("the tiny model needs a corpus to pretrain on")
        return load_tiny(Path(cache_dir), corpus(), seed)
    if name == "smollm2":
        from .smollm2 import load_smollm2

        model, tokenizer, digest = load_smollm2(Path(cache_dir))
        return BaseModel("smollm2", model, tokenizer, digest)
    raise ModelError(f"unknown base model {name!r} (expected 'tiny' or 'smollm2')")


def load_tiny(cache_dir: Path, texts: list[str], seed: int = 0, spec: TinySpec = TINY) -> BaseModel:
    """The tiny Llama pretrained on `texts`, cached under `cache_dir/tiny-<key>/`."""
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ModelError("the tiny model's corpus must be a non-empty list of non-empty strings")
    path = cache_dir / f"tiny-{_tiny_key(texts, seed, spec)}"
    if not path.is_dir():
        model, tokenizer = build_tiny(texts, seed, spec)
        _save_atomically(path, model, tokenizer)
    with _no_progress_bars():
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval().requires_grad_(False)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return BaseModel("tiny", model, tokenizer, weights_digest(model))


def build_tiny(texts: list[str], seed: int, spec: TinySpec = TINY) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Train the tokenizer, initialise the Llama from `seed` and pretrain it on `texts` (deterministic)."""
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(spec.llama_config(len(tokenizer)))
        _pretrain(model, tokenizer, texts, seed, spec)
    model.eval().requires_grad_(False)
    return model, tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <pad>=0, <s>=1, </s>=2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], seed: int, spec: TinySpec
) -> None:
    """Full fine-tune on the corpus packed into fixed-length blocks (bos text eos bos text eos ...)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    block = spec.pretrain_block
    if len(stream) < block + 1:
        stream = stream * (block // len(stream) + 2)
    n_blocks = (len(stream) - 1) // block
    data = torch.tensor(stream[: n_blocks * block], dtype=torch.long).view(n_blocks, block)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / spec.pretrain_steps)
    model.train()
    for _ in range(spec.pretrain_steps):
        batch = data[torch.randint(n_blocks, (spec.pretrain_batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def _tiny_key(texts: list[str], seed: int, spec: TinySpec) -> str:
    corpus = hashlib.sha256()
    for text in texts:
        data = text.encode()
        corpus.update(len(data).to_bytes(8, "little") + data)
    recipe = {"corpus": corpus.hexdigest(), "spec": asdict(spec), "seed": seed, "recipe_version": 1}
    return hashlib.sha256(canonical_json(recipe)).hexdigest()[:16]


def _save_atomically(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _no_progress_bars():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # a concurrent builder won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-file progress bars (loading a tiny model is instantaneous)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def weights_digest(model: torch.nn.Module) -> str:
    """Hex sha256 over every tensor in sorted-name order: name, dtype, shape, little-endian bytes."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        header = {"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        h.update(canonical_json(header))
        h.update(le_bytes(tensor))
    return h.hexdigest()


def model_identity(base_digest: str, adapter_config: Mapping[str, object]) -> bytes:
    """32-byte on-chain identity of a node's model: sha256 of canonical JSON {base, adapter}."""
    return hashlib.sha256(canonical_json({"base": base_digest, "adapter": dict(adapter_config)})).digest()
