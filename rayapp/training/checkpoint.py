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

A checkpoint can be damaged on disk (a copy cut short by a full disk or a killed process, a file
truncated by hand). Before resuming, :func:`select_checkpoint` checks the reporter's candidates
newest first (:func:`checkpoint_problem`: every file complete) and takes the first good one, with
a warning naming each bad one it passed. The check reads only the files, so every rank that sees
the same files picks the same checkpoint, as FSDP2's collective load requires, without talking to
the others.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "rayapp-ckpt-v3"  # v3: DCP shards + state.pt; v2 kept full state dicts in state.pt (rank 0 only)


class CheckpointFormatError(RuntimeError):
    pass


class CheckpointUnreadable(RuntimeError):
    """Every checkpoint there is is damaged: nothing to resume from."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None when all its files are
    complete: meta.json parses and names a step; DCP's ``.metadata`` unpickles and every shard file
    it lists is there and as long as the byte ranges it records; state.pt is a complete zip archive
    whose members pass their CRC checks. A format from another rayapp version is not a problem here:
    :func:`load_checkpoint` says what to do about it."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            return "meta.json names no step"
    except (OSError, ValueError) as e:
        return f"meta.json: {e}"
    if meta.get("format") != FORMAT:
        return None
    if not (path / ".metadata").is_file():
        return "no .metadata"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ...
        return f".metadata: {type(e).__name__}: {e}"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            return f"shard {name} is missing"
        if f.stat().st_size < size:
            return f"shard {name} has {f.stat().st_size} bytes, .metadata expects at least {size}"
    try:
        with zipfile.ZipFile(path / "state.pt") as z:
            bad = z.testzip()
        if bad is not None:
            return f"state.pt: {bad} fails its CRC check"
    except (OSError, zipfile.BadZipFile) as e:
        return f"state.pt: {e}"
    return None


@dataclass
class Chosen:
    """What :func:`select_checkpoint` picked: its name, its local directory, and the damaged newer
    checkpoints it passed as (name, reason)."""

    name: str
    path: str
    passed: list[tuple[str, str]]


def select_checkpoint(candidates: Iterable[tuple[str, str]], warn: Callable[[str], None] | None = None) -> Chosen | None:
    """The first complete checkpoint of ``candidates``, (name, local directory) pairs newest first
    (taken one at a time: a checkpoint at a URI is downloaded only when its turn comes), or None
    when there are none. Each damaged one passed is named in a warning:
    ``checkpoint <name> is unreadable (<reason>); resuming from <older>``. Raises
    :class:`CheckpointUnreadable` when there are checkpoints but none is complete."""
    bad: list[tuple[str, str]] = []
    for name, local in candidates:
        problem = checkpoint_problem(local)
        if problem is None:
            for b, why in bad:
                if warn is not None:
                    warn(f"checkpoint {b} is unreadable ({why}); resuming from {name}")
            return Chosen(name, local, bad)
        bad.append((name, problem))
    if bad:
        listed = "; ".join(f"{b} ({why})" for b, why in bad)
        raise CheckpointUnreadable(
            f"no checkpoint to resume from is readable: {listed}. Remove {Path(bad[0][0]).parent} to start over, "
            "or train into a new output_dir")
    return None


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


def report_and_remove(reporter, metrics: dict, checkpoint_dir: str | None) -> None:
    """``reporter.report(metrics, checkpoint_dir)``, then remove the temporary directory
    :func:`save_checkpoint` wrote, also when the report fails (storage full or unreachable): a
    failed report must not leave a model-sized copy behind in /tmp."""
    try:
        reporter.report(metrics, checkpoint_dir)
    finally:
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


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
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load_sharded(path, model, optimizer)
    # DCP: "Missing key in checkpoint state_dict: ..." (a CheckpointException when it gathers the ranks'
    # errors, a RuntimeError otherwise), size mismatches; load_sharded: "does not match the model"
    except (RuntimeError, CheckpointException) as e:
        if not any(m in str(e).lower() for m in ("missing key", "unexpected key", "size mismatch", "does not match the model")):
            raise
        raise CheckpointFormatError(
            f"checkpoint {path} was written for another model than this job's ({str(e).strip().splitlines()[-1]}): "
            f"the job's model, student or adapter changed since. Train into a new output_dir, or remove "
            f"{Path(path).parent} to start over"
        ) from e
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
