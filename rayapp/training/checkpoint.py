"""Resumable checkpoints, shared by the step loop and the RL loop.

A checkpoint is a directory with ``state.pt`` (the trainable parameters and the optimizer state,
both full / unsharded, the RNG state, extra modules such as an EMA teacher, and the number of
optimizer steps taken) and ``meta.json`` (the loop's step). Rank 0 writes it into a temporary
directory that the Reporter hands to Ray Train (or copies, in a single process) and the caller
removes afterwards. Frozen parameters (the base model under LoRA) are left out: they are reloaded
from model.path.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from rayapp.data.readers import read_jsonl, write_jsonl_atomic

FORMAT = "rayapp-ckpt-v2"  # v1 kept the LR scheduler's state instead of optimizer_steps


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) state dicts of the trainable parameters and the optimizer.

    A collective under FSDP (every rank must call it); plain state dicts under DDP or one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=distributed, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=opts)


def save_checkpoint(model, optimizer, step: int, optimizer_steps: int, extra_modules: dict | None, rank: int) -> str | None:
    """Every rank calls this; rank 0 writes the checkpoint directory and returns its path (else None).

    ``step`` is the loop's own count (optimizer steps for the step loop, iterations for RL);
    ``optimizer_steps`` is where the learning-rate schedule continues on resume."""
    model_sd, optim_sd = _full_state(model, optimizer)
    if rank != 0:
        return None
    d = tempfile.mkdtemp(prefix=f"rayapp-ckpt-{step}-")
    torch.save(
        {
            "model": model_sd,
            "optimizer": optim_sd,
            "optimizer_steps": optimizer_steps,
            "rng": torch.get_rng_state(),
            "extra": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in (extra_modules or {}).items()},
        },
        os.path.join(d, "state.pt"),
    )
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"step": step, "format": FORMAT}, f)
    return d


def load_checkpoint(path: str, model, optimizer, extra_modules: dict | None = None) -> tuple[int, int]:
    """Load model, optimizer and ``extra_modules`` state from ``path`` on this rank.
    Returns (step, optimizer_steps)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    for key, module in (extra_modules or {}).items():
        if key not in state.get("extra", {}):
            raise RuntimeError(f"checkpoint {path} has no state for {key!r} (saved by an older version?); "
                               "start from scratch with a new output_dir")
        module.load_state_dict(state["extra"][key])
    with open(os.path.join(path, "meta.json")) as f:
        step = int(json.load(f)["step"])
    optimizer_steps = state["optimizer_steps"] if "optimizer_steps" in state else state["scheduler"]["last_epoch"]
    return step, int(optimizer_steps)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics rows a killed run wrote after its last checkpoint (they are re-run)."""
    if not path.exists():
        return
    write_jsonl_atomic(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step] if step else [])
