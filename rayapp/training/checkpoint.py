"""Resumable checkpoints, shared by the step loop and the RL loop: one format for every strategy.

A checkpoint is a directory holding

* the trainable weights and the optimizer state as a ``torch.distributed.checkpoint`` (DCP)
  checkpoint (:func:`rayapp.training.parallel.save_sharded`): each rank writes its own shard
  file ``__<rank>_0.distcp`` and rank 0 the ``.metadata``. Under FSDP2 every rank writes its
  1/N; under DDP DCP writes each replicated tensor once. Frozen parameters (the base model under
  LoRA) are left out: they are reloaded from model.path;
* ``state.pt`` from rank 0: what the loop needs besides weights and optimizer (the optimizer steps
  taken, where the learning-rate schedule continues; rank 0's RNG state; extra modules such as an
  EMA teacher, which every rank holds whole);
* ``meta.json`` from rank 0: the loop's step, the format and the world size that wrote it.

Every rank writes into a local temporary directory of its own and reports it to Ray Train, which
copies all of them into the one checkpoint directory under ``output_dir/checkpoints/`` (the file
names never collide); a single process copies it with the LocalReporter. Loading reads that
directory on every rank; DCP reshards, so a checkpoint written by N workers resumes on M.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "rayapp-ckpt-v3"  # v3: DCP shards + state.pt; v2 kept full state dicts in state.pt (rank 0 only)


class CheckpointFormatError(RuntimeError):
    pass


def save_checkpoint(model, optimizer, step: int, optimizer_steps: int, extra_modules: dict | None, rank: int,
                    world: int = 1) -> str:
    """Every rank calls this (a collective under FSDP2) and gets back the temporary directory it
    wrote, which it reports (and removes afterwards).

    ``step`` is the loop's own count (optimizer steps for the step loop, iterations for RL);
    ``optimizer_steps`` is where the learning-rate schedule continues on resume."""
    from rayapp.training.parallel import save_sharded

    d = tempfile.mkdtemp(prefix=f"rayapp-ckpt-{step}-r{rank}-")
    save_sharded(d, model, optimizer)
    if rank == 0:
        torch.save(
            {
                "optimizer_steps": optimizer_steps,
                "rng": torch.get_rng_state(),
                "extra": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in (extra_modules or {}).items()},
            },
            os.path.join(d, "state.pt"),
        )
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"step": step, "format": FORMAT, "world_size": world}, f)
    return d


def load_checkpoint(path: str, model, optimizer, extra_modules: dict | None = None) -> tuple[int, int]:
    """Load model, optimizer and ``extra_modules`` state from ``path`` on this rank (every rank
    calls it: a collective under FSDP2). Returns (step, optimizer_steps)."""
    from rayapp.training.parallel import load_sharded

    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"checkpoint {path} has format {meta.get('format', 'unknown')!r}, this rayapp reads {FORMAT!r} "
            "(sharded); it was written by an older rayapp: train into a new output_dir, or remove "
            f"{Path(path).parent} to start over"
        )
    load_sharded(path, model, optimizer)
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    for key, module in (extra_modules or {}).items():
        if key not in state.get("extra", {}):
            raise CheckpointFormatError(f"checkpoint {path} has no state for {key!r} (saved by another method "
                                        "or an older version?); start from scratch with a new output_dir")
        module.load_state_dict(state["extra"][key])
    return int(meta["step"]), int(state["optimizer_steps"])


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics rows a killed run wrote after its last checkpoint (they are re-run).
    A half-written last line (the writer killed mid-row) is dropped too."""
    from rayapp.fileio import write_text_atomic

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if step and isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))
