"""The step loop every training recipe shares: data order, gradient accumulation, schedule,
evaluation, checkpoints, metrics and progress.

It is plain PyTorch. Ray Train enters only through the ``Reporter`` a recipe passes in
(``RayReporter`` in launch.py), so the loop also runs in a single process (tests, notebooks).

Loss normalisation: a recipe's ``loss_fn`` returns a *sum* over its units (tokens for SFT,
pairs for DPO) and the number of units. Before the backward passes of one optimizer step,
each worker counts the units in its micro-batches and the counts are all-reduced, so every
micro-batch loss is divided by the *global* count of the step. The gradient is therefore the
exact global per-unit mean however the batch is split: 1 worker x 8 micro-batches of 1 equals
1 x 1 of 8 equals 2 workers x 4 (per-rank means would weight ranks with fewer tokens more).
DDP averages gradients over ranks, so each rank scales its loss by ``world_size``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from rayapp.config.base import TrainConfig
from rayapp.data.readers import read_jsonl, write_jsonl_atomic

PROGRESS_EVERY_S = 2.0  # seconds between progress lines


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of the per-unit losses of the micro-batch
    count: int  # units in the micro-batch (must equal what count_fn said)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # extra metrics as sums over units


class Reporter(Protocol):
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint(self) -> str | None: ...


class LocalReporter:
    """Reporter for single-process runs: keeps metrics, copies checkpoints into ``root``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else None
        self.history: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.history.append(metrics)
        if checkpoint_dir and self.root:
            dest = self.root / f"step_{metrics['step']:06d}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dest)

    def latest_checkpoint(self) -> str | None:
        if not self.root or not self.root.exists():
            return None
        steps = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").exists())
        return str(steps[-1]) if steps else None


@dataclass
class LoopResult:
    step: int
    metrics: dict
    resumed_from: int | None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def total_steps_for(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.global_batch_size))


def global_batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step ``step``: a seeded permutation per epoch, read as a stream."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(i, n)
        perm = _perm(n, seed, epoch)
        out.append(perm[pos])
    return out


_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        rng = random.Random(seed * 1_000_003 + epoch)
        p = list(range(n))
        rng.shuffle(p)
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = p
    return _PERM_CACHE[key]


def fit(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_items: list,
    val_items: list | None,
    collate: Callable[[list], dict],
    count_fn: Callable[[dict], int],
    loss_fn: Callable[[torch.nn.Module, dict], LossParts],
    cfg: TrainConfig,
    micro_batch_size: int,
    reporter: Reporter,
    metrics_path: str | os.PathLike | None = None,
    name: str = "train",
    unit: str = "tok",
    device: torch.device | str = "cpu",
    extra_modules: dict[str, torch.nn.Module] | None = None,
) -> LoopResult:
    """Train ``model`` for the configured steps. Every rank calls this with the same arguments.

    ``extra_modules`` are modules whose state is not in ``model`` or the optimizer but changes as
    training goes (an EMA teacher): saved in every checkpoint from rank 0 and restored on resume on
    every rank, so a resumed run continues from the same state instead of re-initialising it.
    """
    rank, world = _rank_world()
    n = len(train_items)
    G = cfg.global_batch_size
    if G % (micro_batch_size * world):
        raise ValueError(f"global batch {G} is not a multiple of micro-batch {micro_batch_size} x {world} workers")
    per_rank = G // world
    total = total_steps_for(cfg, n)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))

    start_step, resumed_from = 0, None
    ckpt = reporter.latest_checkpoint()
    if ckpt:
        start_step = _load_checkpoint(ckpt, model, optimizer, scheduler, extra_modules)
        resumed_from = start_step
        # The learning rate follows this run's schedule (a re-run may change max_steps or epochs).
        schedule = lr_lambda(cfg, total)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(start_step)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if rank == 0:
            print(f"[{name}] resuming from checkpoint at step {start_step} ({ckpt})", flush=True)
    if rank == 0 and metrics_path:
        _truncate_metrics(Path(metrics_path), start_step)

    torch.manual_seed(cfg.seed + 1000 * rank + start_step)
    last_metrics: dict = {}
    t_start = last_print = time.perf_counter()
    tokens_seen = 0
    for step in range(start_step, total):
        t0 = time.perf_counter()
        model.train()
        idx = global_batch_indices(step, n, G, cfg.seed)[rank::world]
        batches = [collate([train_items[i] for i in idx[k : k + micro_batch_size]]) for k in range(0, per_rank, micro_batch_size)]
        local_count = sum(count_fn(b) for b in batches)
        global_count = int(_all_reduce(torch.tensor([local_count], dtype=torch.long)).item())
        scale = world / max(1, global_count)
        loss_total = torch.zeros((), dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(batches):
            batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            sync = k == len(batches) - 1
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _null()
            with ctx:
                parts = loss_fn(model, batch)
                (parts.loss_sum * scale).backward()
            loss_total += parts.loss_sum.detach().double().cpu()
            for key, v in parts.sums.items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + v.detach().double().cpu()
        grad_norm = None
        if cfg.max_grad_norm is not None and params:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)
        red = _all_reduce(torch.stack([loss_total] + [sums[k] for k in keys]))
        dt = time.perf_counter() - t0
        tokens_seen += global_count
        metrics = {"step": step + 1, "epoch": round((step + 1) * G / n, 4), "loss": float(red[0]) / max(1, global_count), "lr": lr}
        metrics.update({k: float(v) / max(1, global_count) for k, v in zip(keys, red[1:], strict=True)})
        metrics.update({"units": global_count, "units_per_s": global_count / dt, "step_time_s": dt})
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        done = step + 1 == total
        if val_items and ((step + 1) % cfg.eval_every == 0 or done):
            metrics.update(evaluate(model, val_items, collate, count_fn, loss_fn, micro_batch_size, device))
        ckpt_dir = None
        if (step + 1) % cfg.checkpoint_every == 0 or done:
            ckpt_dir = _save_checkpoint(model, optimizer, scheduler, step + 1, extra_modules, rank)
        if rank == 0:
            if metrics_path and ((step + 1) % cfg.log_every == 0 or done or "val_loss" in metrics):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            now = time.perf_counter()
            # One line every PROGRESS_EVERY_S (and the first, the last and every evaluation): readable
            # in a terminal and in Ray job logs alike; metrics.jsonl keeps every step.
            if step == start_step or done or "val_loss" in metrics or now - last_print >= PROGRESS_EVERY_S:
                _progress(name, unit, step + 1, total, metrics, now - t_start, step + 1 - start_step)
                last_print = now
        if (step + 1) % cfg.checkpoint_every == 0 or done:
            # Ray Train's report is a barrier through its controller (~0.1-1 s): only at checkpoints.
            # Every rank reaches the same steps here, as the barrier requires; metrics.jsonl has every step.
            reporter.report(metrics, ckpt_dir)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        last_metrics = metrics
    return LoopResult(step=total, metrics=last_metrics, resumed_from=resumed_from)


@torch.no_grad()
def evaluate(model, items, collate, count_fn, loss_fn, micro_batch_size, device="cpu") -> dict:
    """Validation loss (and metric sums) over ``items``, sharded over ranks, as global per-unit means."""
    rank, world = _rank_world()
    model.eval()
    mine = items[rank::world]
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    sums: dict[str, torch.Tensor] = {}
    for k in range(0, len(mine), micro_batch_size):
        batch = collate(mine[k : k + micro_batch_size])
        count += count_fn(batch)
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        parts = loss_fn(model, batch)
        loss_sum += parts.loss_sum.double().cpu()
        for key, v in parts.sums.items():
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + v.double().cpu()
    keys = sorted(sums)
    # Every rank must take part in the all-reduce with the same keys, even with no items.
    keys = _agree_keys(keys)
    red = _all_reduce(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)] + [sums.get(k, torch.zeros((), dtype=torch.float64)) for k in keys]))
    total = max(1.0, float(red[1]))
    out = {"val_loss": float(red[0]) / total}
    out.update({f"val_{k}": float(v) / total for k, v in zip(keys, red[2:], strict=True)})
    model.train()
    return out


def _agree_keys(keys: list[str]) -> list[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return keys
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted(set().union(*[set(g) for g in gathered]))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) state dicts of the trainable parameters and the optimizer.

    A collective under FSDP (every rank must call it); plain state dicts under DDP or one process.
    Frozen parameters (the base model under LoRA) are left out: they are reloaded from model.path.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=distributed, ignore_frozen_params=True)
    return get_state_dict(model, optimizer, options=opts)


def _save_checkpoint(model, optimizer, scheduler, step: int, extra_modules: dict | None, rank: int) -> str | None:
    """Every rank calls this; rank 0 writes the checkpoint directory and returns its path."""
    model_sd, optim_sd = _full_state(model, optimizer)
    if rank != 0:
        return None
    d = tempfile.mkdtemp(prefix=f"rayapp-ckpt-{step}-")
    torch.save(
        {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "extra": {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in (extra_modules or {}).items()},
        },
        os.path.join(d, "state.pt"),
    )
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"step": step, "format": "rayapp-ckpt-v1"}, f)
    return d


def _load_checkpoint(path: str, model, optimizer, scheduler, extra_modules: dict | None = None) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    for key, module in (extra_modules or {}).items():
        if key not in state.get("extra", {}):
            raise RuntimeError(f"checkpoint {path} has no state for {key!r} (saved by an older version?); "
                               "start from scratch with a new output_dir")
        module.load_state_dict(state["extra"][key])
    with open(os.path.join(path, "meta.json")) as f:
        return int(json.load(f)["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows a killed run wrote after its last checkpoint (they are re-run)."""
    if not path.exists():
        return
    write_jsonl_atomic(path, [r for r in read_jsonl(path) if r.get("step", 0) <= step] if step else [])


def _progress(name: str, unit: str, step: int, total: int, m: dict, elapsed: float, steps_done: int) -> None:
    width = 24
    filled = int(width * step / total)
    bar = "█" * filled + "░" * (width - filled)
    eta = elapsed / max(1, steps_done) * (total - step)
    extra = f" val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    print(
        f"[{name}] {step:>5}/{total} ▕{bar}▏ loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} "
        f"{m['units_per_s']:.0f} {unit}/s eta {int(eta) // 60}:{int(eta) % 60:02d}",
        # sys.__stdout__: Ray Train patches print() to also log it, which would show every line twice.
        file=sys.__stdout__,
        flush=True,
    )
