"""A global adapter out as a Hugging Face PEFT folder, loadable with `PeftModel.from_pretrained`."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..learning.models import BaseModel
from ..learning.settings import LoraSettings, PromptSettings
from ..protocol.packaging import pack_adapter


def export_peft(state: Mapping[str, torch.Tensor], base: BaseModel, adapter: LoraSettings | PromptSettings,
                out_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors loadable by `PeftModel.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = adapter.peft_config()
    config.base_model_name_or_path = base.name
    config.save_pretrained(out_dir)
    metadata = {"format": "pt", "fedchain.base_model": base.digest}
    (out_dir / "adapter_model.safetensors").write_bytes(pack_adapter(state, metadata))
