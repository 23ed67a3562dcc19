"""The configuration reference, generated from the config dataclasses: every section and key with its type,
default and the comment beside it in the source (`fednode/ops/config.py`; `DOCS` for the learning settings,
whose source carries none). `toml_file` writes a config with every key shown and commented; `markdown` is
docs/configuration.md (`python -m fednode.ops.reference > docs/configuration.md`; a test keeps it current)."""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
from dataclasses import dataclass

from .config import SECTIONS

DOCS = {
    ("train", "steps"): "local optimizer steps per round",
    ("train", "lr"): "AdamW learning rate",
    ("train", "batch_size"): "examples per step",
    ("train", "max_length"): "tokens per example (longer ones are cut)",
    ("train", "seed"): "seed of the batch order (and of DP noise)",
    ("lora", "r"): "LoRA rank",
    ("lora", "alpha"): "LoRA scaling numerator (scale = alpha / r)",
    ("lora", "dropout"): "LoRA dropout during local training",
    ("lora", "target_modules"): "the base model's linear layers that get an adapter",
    ("prompt", "num_virtual_tokens"): "trained input embeddings (with [federation] adapter = \"prompt\")",
}
SECTION_DOCS = {
    "chain": "the chain and the federation's deployment record",
    "storage": "the IPFS node (or an embedded store folder) holding adapters and documents",
    "wallet": "this participant's keystore and where its password comes from",
    "model": "the base model every participant must share",
    "data": "the data partition: everything but `client` must be the same for every participant",
    "train": "local training, per round",
    "lora": "the LoRA adapter (the federation's rules commit to it)",
    "prompt": "the prompt-tuning adapter",
    "federation": "the rules the aggregator commits on-chain every round (nodes check they match)",
    "node": "how a hospital submits its updates: its own transactions, or signed and relayed by the aggregator",
    "aggregator": "the aggregator's relay endpoint for hospitals that submit through it",
}


@dataclass(frozen=True)
class Key:
    """One config key: its section, name, TOML type, default and what it means."""
    section: str
    name: str
    type: str
    default: object
    doc: str


def _source_comments(cls) -> dict[str, str]:
    """The comment on each field's line of a dataclass's source, continued by the comment-only lines below it."""
    comments: dict[str, list[str]] = {}
    current = None
    names = {f.name for f in dataclasses.fields(cls)}
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    line_start = True
    for tok in tokens:
        if tok.type == tokenize.NAME and line_start and tok.string in names:
            current = tok.string
        elif tok.type == tokenize.NAME and line_start:
            current = None
        if tok.type == tokenize.COMMENT and current is not None:
            comments.setdefault(current, []).append(tok.string.lstrip("#").strip())
        line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        if tok.type in (tokenize.NL, tokenize.NEWLINE) and tok.line.strip() and not tok.line.strip().startswith("#") \
                and current is not None and not tok.line.lstrip().startswith(current):
            current = None
    return {name: " ".join(parts) for name, parts in comments.items()}


def keys() -> list[Key]:
    """Every key of every section, in file order."""
    out = []
    for section, cls in SECTIONS.items():
        comments = _source_comments(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            type_ = f.type if isinstance(f.type, str) else f.type.__name__
            value = getattr(default, f.name)
            out.append(Key(section, f.name, "list of strings" if type_.startswith("tuple") else type_,
                           list(value) if isinstance(value, tuple) else value,
                           comments.get(f.name) or DOCS.get((section, f.name), "")))
    return out


def toml_value(value) -> str:
    """A value as TOML: JSON for scalars and lists, an inline table for a dict."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def toml_file(title: str, values: dict[str, dict]) -> str:
    """A config file: every section and key, the keys in `values` set, the others commented out at their default,
    each with what it means."""
    lines = [f"# {title}", "# Every key is shown; a commented-out key has its default. Reference: docs/configuration.md",
             ""]
    by_section: dict[str, list[Key]] = {}
    for key in keys():
        by_section.setdefault(key.section, []).append(key)
    for section, section_keys in by_section.items():
        lines.append(f"[{section}]  # {SECTION_DOCS[section]}")
        for key in section_keys:
            set_ = key.name in values.get(section, {})
            value = values[section][key.name] if set_ else key.default
            assignment = f"{'' if set_ else '# '}{key.name} = {toml_value(value)}"
            note = key.doc + ("" if not set_ or value == key.default else f" (default {toml_value(key.default)})")
            lines.append(f"{assignment:<40}  # {note}" if note else assignment)
        lines.append("")
    return "\n".join(lines)


def markdown() -> str:
    """The configuration reference as markdown."""
    lines = ["# Configuration reference", "",
             "Generated from the config dataclasses by `python -m fednode.ops.reference` (do not edit by hand). "
             "One TOML file per participant; `fedchain init DIR` writes commented examples. Relative paths are "
             "relative to the config file's folder.", ""]
    section = None
    for key in keys():
        if key.section != section:
            section = key.section
            lines += ["", f"## [{section}]", "", SECTION_DOCS[section], "", "| key | type | default | meaning |",
                      "|---|---|---|---|"]
        lines.append(f"| `{key.name}` | {key.type} | `{toml_value(key.default)}` | {key.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
