"""LoRA with peft: wrap a causal LM, and export the adapter and/or a merged model."""

from __future__ import annotations

import os
from pathlib import Path

from rayapp.fileio import replace_dir_atomic


def apply_lora(model, adapter):
    """Wrap ``model`` with a LoRA adapter from an AdapterConfig; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def export_lora(peft_model, tokenizer, output_dir: str | os.PathLike, export: str) -> dict[str, Path]:
    """Write ``adapter/`` (peft format) and/or a merged ``model/`` (plain HF safetensors)."""
    out = Path(output_dir)
    written: dict[str, Path] = {}
    if export in ("adapter", "both"):

        def write_adapter(d: Path) -> None:
            peft_model.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)

        written["adapter"] = replace_dir_atomic(out / "adapter", write_adapter)
    if export in ("merged", "both"):
        merged = peft_model.merge_and_unload()

        def write_model(d: Path) -> None:
            merged.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)

        written["model"] = replace_dir_atomic(out / "model", write_model)
    return written
