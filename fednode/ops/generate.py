"""`fedchain generate`: a quick look at what an exported adapter writes, loaded the way a user would
(`AutoPeftModelForCausalLM`, or `AutoModelForCausalLM` for a full-parameter model; offline)."""
from __future__ import annotations

from pathlib import Path


def generate(adapter_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` by the base model with the exported adapter in `adapter_dir` (or by the
    exported full-parameter model there)."""
    adapter_dir = Path(adapter_dir)
    full = not (adapter_dir / "adapter_config.json").is_file()
    if full and not (adapter_dir / "config.json").is_file():
        raise ValueError(f"{adapter_dir} is not an exported adapter or model (no adapter_config.json or config.json): "
                         "write one with `fedchain adapter export`")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    import warnings

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loader = AutoModelForCausalLM if full else AutoPeftModelForCausalLM
        model = loader.from_pretrained(adapter_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
