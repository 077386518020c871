"""Resolve, load and save models: local Hugging Face directories in safetensors.

``resolve_model("tiny")`` builds (once) the locally trained tiny model;
``resolve_model("smollm2-135m-instruct")`` converts (once) the packaged SmolLM2;
an existing directory must hold config.json and *.safetensors; anything else that reads as a
Hugging Face Hub id (``ORG/NAME``, pinned as ``ORG/NAME@REVISION``) is fetched once into the
Hugging Face cache (rayapp/models/hub.py: where, offline mode, what is recorded).
Built models are cached under ``$RAYAPP_CACHE`` (default ``~/.cache/rayapp``), guarded by a
file lock so concurrent workers build once.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from rayapp.errors import UserError
from rayapp.fileio import cache_dir, replace_dir_atomic  # noqa: F401 (cache_dir: imported from here by others)
from rayapp.models.hub import ResolvedModel, parse_hub_ref, resolve_hub_model
from rayapp.models.packaged import PACKAGED, convert_packaged
from rayapp.models.tiny import build_tiny_model, parse_tiny_ref

BUILTIN_NAMES = ("tiny", *PACKAGED)


class ModelError(UserError, ValueError):
    """A model reference that cannot be used, with what to do about it."""


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model(ref: str, field: str = "model.path") -> Path:
    """Turn a model reference into a local directory, building or converting built-in models once
    and fetching Hub ids once. ``field`` names the config field the reference came from, for error
    messages. :func:`resolve_model_info` says also where the directory came from."""
    return resolve_model_info(ref, field).path


def resolve_model_info(ref: str, field: str = "model.path") -> ResolvedModel:
    """Like :func:`resolve_model`, with what to record: the local path, and for a Hub model its repo
    id and the commit hash read (``.record()`` for config.resolved.yaml, ``.pinned_ref`` for workers).
    An ``s3://`` / ``gs://`` URI (a job's published model/) is downloaded once into the local cache
    (:func:`rayapp.storage.fetch_dir`)."""
    from rayapp.storage import is_uri

    if is_uri(ref):
        from rayapp.storage import StorageError, fetch_dir

        try:
            return ResolvedModel(ref=ref, path=fetch_dir(ref), source="uri")
        except StorageError as e:
            raise ModelError(f"{field} '{ref}': {e}") from e
    if ref == "tiny" or ref.startswith("tiny:"):
        try:
            spec = parse_tiny_ref(ref)
        except ValueError as e:
            raise ModelError(f"{field} {e}") from None
        out = cache_dir() / "models" / f"tiny-{spec.key()}"
        with _file_lock(cache_dir() / "locks" / f"{out.name}.lock"):
            if not (out / "config.json").exists():
                build_tiny_model(out, spec)
        return ResolvedModel(ref=ref, path=out, source="builtin")
    if ref in PACKAGED:
        out = cache_dir() / "models" / ref
        with _file_lock(cache_dir() / "locks" / f"{ref}.lock"):
            if not (out / "config.json").exists():
                convert_packaged(ref, out)
        return ResolvedModel(ref=ref, path=out, source="builtin")
    path = Path(ref).expanduser()
    if not path.exists():
        hub = parse_hub_ref(ref)
        if hub is not None:
            return resolve_hub_model(ref, hub, field, not_local=(
                f"no such directory and not a built-in model ({', '.join(BUILTIN_NAMES)}); "
            ))
        raise ModelError(
            f"{field} '{ref}': no such directory, and not a built-in model ({', '.join(BUILTIN_NAMES)}) or a "
            "Hugging Face Hub id (ORG/NAME or ORG/NAME@REVISION); give a local Hugging Face directory"
        )
    if not (path / "config.json").exists():
        raise ModelError(f"{field} '{ref}': {path} has no config.json; is it a Hugging Face model directory?")
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{field} '{ref}': {path} has no *.safetensors weights; rayapp loads safetensors only "
            "(convert .bin weights with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    # absolute: Ray workers run in other working directories
    return ResolvedModel(ref=ref, path=path.resolve(), source="directory")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(ref: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(str(ref))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    path = resolve_model(str(ref))
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )


def disable_dropout(model):
    """Turn every dropout of ``model`` off, whatever its train/eval mode (TRL's ``disable_dropout``):
    ``nn.Dropout`` modules (LoRA's lora_dropout among them) get p = 0, and attention modules'
    ``attention_dropout`` rate (applied functionally in train mode) becomes 0. Policy-gradient and
    preference losses compare log-probs of the same weights taken in two passes (old vs new, policy
    vs reference); with dropout on, those differ by the dropout noise alone (PPO ratios of
    0.75-1.28 at LoRA dropout 0.1 with identical weights). Returns ``model``."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def save_model_atomic(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """save_pretrained into a temporary sibling, then rename into place: a reader never sees half a model."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return replace_dir_atomic(out_dir, write)


def unwrap(model):
    """The module a data-parallel wrapper (DDP) holds, or ``model`` itself: what has the Hugging Face
    methods (save_pretrained, disable_adapter) and the parameter names checkpoints and engines use."""
    import torch

    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_stamp(model_dir: str | os.PathLike | None) -> list | None:
    """What identifies a model's weights without reading them: the path, and each weight, config and
    tokenizer file's name, size and modification time. A model retrained into the same directory
    gets a new stamp, so output cached from the old one is not reused."""
    if model_dir is None:
        return None
    files = sorted(f for pattern in ("*.safetensors", "config.json", "tokenizer*.json") for f in Path(model_dir).glob(pattern))
    return [str(model_dir)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def wants_chat(setting: str, model_dir: str | os.PathLike) -> bool:
    """Whether to send prompts to the model in ``model_dir`` as chat messages: ``setting`` is a job's
    ``chat`` field ('always', 'never', or 'auto': when the model's tokenizer has a chat template)."""
    from rayapp.data.tokenize import has_chat_template

    if setting in ("always", "never"):
        return setting == "always"
    return has_chat_template(load_tokenizer(str(model_dir)))
