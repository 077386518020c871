"""The step loop every training recipe shares: data order, gradient accumulation, the optimizer
and its schedule (:func:`build_optimizer`, also used by the RL loop), evaluation, checkpoints,
metrics and progress.

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

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from rayapp.algorithms.sft import response_mask
from rayapp.training.checkpoint import (
    load_checkpoint,
    report_and_remove,
    save_checkpoint,
    select_checkpoint,
    truncate_metrics,
)
from rayapp.training.parallel import clip_grad_norm

if TYPE_CHECKING:  # the loop itself needs no pydantic: bench/gpu_train_step.py runs it with torch + transformers only
    from rayapp.config.base import TrainConfig

PROGRESS_EVERY_S = 120.0  # most seconds between two progress lines
PROGRESS_LINES = 3  # a line each third of the run (and the first, the last, each evaluation)


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of the per-unit losses of the micro-batch
    count: int  # units in the micro-batch (must equal what count_fn said)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # extra metrics as sums over units


class Reporter(Protocol):
    """Where the loop's checkpoints go. ``report`` is called by every rank at every checkpoint with
    the directory that rank wrote (its shard); ``keeps_checkpoints`` False skips writing them.
    ``latest_checkpoint`` is the newest *complete* checkpoint as a local directory (damaged newer
    ones are passed with a warning: :func:`rayapp.training.checkpoint.select_checkpoint`)."""

    keeps_checkpoints: bool

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint(self) -> str | None: ...


class LocalReporter:
    """Reporter without Ray: keeps metrics, copies checkpoints into ``root`` (none are written
    without a root). Also for the ranks of a torch process group of its own (tests, benches)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else None
        self.history: list[dict] = []
        self._latest = None  # the checkpoint chosen since the last report

    @property
    def keeps_checkpoints(self) -> bool:
        return self.root is not None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.history.append(metrics)
        self._latest = None
        if checkpoint_dir and self.root:
            # Every rank of a process group reports its own shard files: merged, as Ray Train does.
            # meta.json (rank 0's) goes last: a copy cut short is never taken for a checkpoint.
            # A copy that fails (a full disk) is removed: no half checkpoint is left behind.
            dest = self.root / f"step_{metrics['step']:06d}"
            try:
                shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True, ignore=lambda d, names: ["meta.json"])
                if os.path.exists(os.path.join(checkpoint_dir, "meta.json")):
                    shutil.copy2(os.path.join(checkpoint_dir, "meta.json"), dest / "meta.json")
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise

    def checkpoint_candidates(self) -> list[str]:
        """The step_* directories under ``root`` with a meta.json, newest first."""
        if not self.root or not self.root.exists():
            return []
        return [str(p) for p in sorted(self.root.glob("step_*"), reverse=True) if (p / "meta.json").exists()]

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint under ``root`` (damaged newer ones are passed with a
        warning from rank 0)."""
        if self._latest is None:
            rank = rank_world()[0]
            self._latest = select_checkpoint(((p, p) for p in self.checkpoint_candidates()),
                                             warn=(lambda m: print(f"WARNING: {m}", file=sys.stderr, flush=True)) if rank == 0 else None)
        return self._latest.path if self._latest else None


@dataclass
class LoopResult:
    step: int
    metrics: dict
    resumed_from: int | None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Each named value summed over ranks, in one all-reduce; every rank passes the same names."""
    names = sorted(sums)
    total = all_reduce(torch.tensor([float(sums[k]) for k in names], dtype=torch.float64))
    return dict(zip(names, total.tolist(), strict=True))


def even_batches(n: int, rank: int, world: int, micro_batch_size: int) -> list[list[int] | None]:
    """This rank's share of ``n`` items (every ``world``-th index from ``rank``) in micro-batches,
    padded with ``None`` so every rank has the same number of batches.

    Under FSDP2 every forward is a collective (each unit all-gathers its parameters), so ranks must
    run the same number of forwards or the one with more waits forever for the others. A ``None``
    batch means: run a forward on a stand-in batch and drop its result."""
    mine = list(range(rank, n, world))
    batches: list[list[int] | None] = [mine[k : k + micro_batch_size] for k in range(0, len(mine), micro_batch_size)]
    most = math.ceil(math.ceil(n / world) / micro_batch_size) if n else 0
    return batches + [None] * (most - len(batches))


def count_supervised(batch) -> int:
    """The loop's ``count_fn`` when the unit is a supervised (response) token."""
    return int(response_mask(batch["labels"]).sum())


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


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule, and where a resumed run continues."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    resumed_step: int | None = None  # the checkpoint's step when resumed from one
    start_optimizer_steps: int = 0

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken, counting those of the run this one resumed."""
        return self.start_optimizer_steps + self.scheduler.last_epoch

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int, *, checkpoint: str | None = None,
                    extra_modules: dict[str, torch.nn.Module] | None = None, lr_multipliers: dict[str, float] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Optimization:
    """The optimizer and learning-rate schedule of every recipe, resumed from ``checkpoint`` if given.

    AdamW over the trainable parameters at ``cfg.peak_lr`` with ``cfg.weight_decay``; parameters
    whose name contains a key of ``lr_multipliers`` form their own group at that multiple (the
    RL value head). ``optimizer`` replaces AdamW (plain SGD in tests). The schedule is
    :func:`lr_lambda` over ``total_steps``.

    Resume rule: model, optimizer and ``extra_modules`` state come from the checkpoint, and the
    learning rate follows *this* run's schedule from the checkpoint's optimizer step (a re-run may
    change max_steps or epochs): the schedule is built after loading, starting at that step.
    """
    if optimizer is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups: dict[float, list] = {}
        for n, p in named:
            mult = next((m for key, m in (lr_multipliers or {}).items() if key in n), 1.0)
            groups.setdefault(mult, []).append(p)
        optimizer = torch.optim.AdamW([{"params": ps, "lr": cfg.peak_lr * m} for m, ps in groups.items()],
                                      lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:  # the schedule's base rate, as LambdaLR records it (and checkpoints hold it)
        group.setdefault("initial_lr", group["lr"])
    resumed_step, done = None, 0
    if checkpoint:
        resumed_step, done = load_checkpoint(checkpoint, model, optimizer, extra_modules)
    schedule = lr_lambda(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule(done + k))
    return Optimization(optimizer, scheduler, resumed_step, done)


def fit(
    *,
    model: torch.nn.Module,
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
    after_step: Callable[[], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    publish_metrics: Callable[[], None] | None = None,
) -> LoopResult:
    """Train ``model`` for the configured steps. Every rank calls this with the same arguments.

    ``model`` is prepared already (:func:`rayapp.training.parallel.prepare_model`: none, DDP or
    FSDP2). The optimizer comes from :func:`build_optimizer` (``optimizer`` replaces its AdamW),
    resumed from the reporter's latest checkpoint when there is one. ``after_step()`` runs after
    every optimizer step (an EMA teacher update). ``extra_modules`` are modules whose state is not
    in ``model`` or the optimizer but changes as training goes (an EMA teacher): saved in every
    checkpoint from rank 0 and restored on resume on every rank, so a resumed run continues from
    the same state instead of re-initialising it. ``publish_metrics()`` runs on rank 0 after the
    rows of a checkpointed step are in ``metrics_path`` and before the checkpoint is reported, and
    once at the end (the output store uploads metrics.jsonl), so the metrics at output_dir always
    reach the latest checkpoint.
    """
    rank, world = rank_world()
    n = len(train_items)
    G = cfg.global_batch_size
    if G % (micro_batch_size * world):
        raise ValueError(f"global batch {G} is not a multiple of micro-batch {micro_batch_size} x {world} workers")
    per_rank = G // world
    total = total_steps_for(cfg, n)
    has_params = any(p.requires_grad for p in model.parameters())
    ckpt = reporter.latest_checkpoint()
    opt = build_optimizer(model, cfg, total, checkpoint=ckpt, extra_modules=extra_modules, optimizer=optimizer)
    if after_step is not None:
        opt.optimizer.register_step_post_hook(lambda *_: after_step())
    start_step = opt.resumed_step or 0
    if ckpt and rank == 0:
        print(f"[{name}] resuming from checkpoint at step {start_step} ({ckpt})", flush=True)
    if rank == 0 and metrics_path:
        truncate_metrics(Path(metrics_path), start_step)

    torch.manual_seed(cfg.seed + 1000 * rank + start_step)
    last_metrics: dict = {}
    t_start = last_print = time.perf_counter()
    for step in range(start_step, total):
        t0 = time.perf_counter()
        model.train()
        idx = global_batch_indices(step, n, G, cfg.seed)[rank::world]
        batches = [collate([train_items[i] for i in idx[k : k + micro_batch_size]]) for k in range(0, per_rank, micro_batch_size)]
        local_count = sum(count_fn(b) for b in batches)
        global_count = int(all_reduce(torch.tensor([local_count], dtype=torch.long)).item())
        scale = world / max(1, global_count)
        sums: dict[str, float] = {"loss": 0.0}
        for k, batch in enumerate(batches):
            batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            sync = k == len(batches) - 1
            with model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext():
                parts = loss_fn(model, batch)
                (parts.loss_sum * scale).backward()
            sums["loss"] += float(parts.loss_sum.detach().double())
            for key, v in parts.sums.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach().double())
        grad_norm = None
        if cfg.max_grad_norm is not None and has_params:
            grad_norm = clip_grad_norm(model, cfg.max_grad_norm)  # the global norm (a collective under FSDP2)
        lr = opt.lr
        opt.step()

        totals = all_reduce_sums(sums)
        dt = time.perf_counter() - t0
        metrics = {"step": step + 1, "epoch": round((step + 1) * G / n, 4), "loss": totals.pop("loss") / max(1, global_count), "lr": lr}
        metrics.update({k: v / max(1, global_count) for k, v in totals.items()})
        metrics.update({"units": global_count, "units_per_s": global_count / dt, "step_time_s": dt})
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        done = step + 1 == total
        if val_items and ((step + 1) % cfg.eval_every == 0 or done):
            metrics.update(evaluate(model, val_items, collate, count_fn, loss_fn, micro_batch_size, device))
        at_checkpoint = (step + 1) % cfg.checkpoint_every == 0 or done
        ckpt_dir = save_checkpoint(model, optimizer=opt.optimizer, step=step + 1, optimizer_steps=opt.optimizer_steps,
                                   extra_modules=extra_modules, rank=rank, world=world) \
            if at_checkpoint and reporter.keeps_checkpoints else None
        if rank == 0:
            if metrics_path and ((step + 1) % cfg.log_every == 0 or done or "val_loss" in metrics):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            now = time.perf_counter()
            # About PROGRESS_LINES + 1 lines a run (and the first, the last, every evaluation, and one at
            # least every PROGRESS_EVERY_S): readable in a terminal and in Ray job logs alike, a
            # short console for a pipeline of several jobs; metrics.jsonl keeps every step.
            tenth = (step + 1) * PROGRESS_LINES // total != step * PROGRESS_LINES // total
            if step == start_step or done or "val_loss" in metrics or tenth or now - last_print >= PROGRESS_EVERY_S:
                _progress(name, unit, step + 1, total, metrics, now - t_start, step + 1 - start_step)
                last_print = now
            if at_checkpoint and publish_metrics is not None:
                publish_metrics()
        if at_checkpoint:
            # Ray Train's report is a barrier through its controller (~0.1-1 s): only at checkpoints.
            # Every rank reaches the same steps here, as the barrier requires; metrics.jsonl has every step.
            report_and_remove(reporter, metrics, ckpt_dir)
        last_metrics = metrics
    if rank == 0 and publish_metrics is not None:
        publish_metrics()
    return LoopResult(step=total, metrics=last_metrics, resumed_from=opt.resumed_step)


@torch.no_grad()
def evaluate(model, items, collate, count_fn, loss_fn, micro_batch_size, device="cpu") -> dict:
    """Validation loss (and metric sums) over ``items``, sharded over ranks, as global per-unit means.
    Every rank runs the same number of forwards (:func:`even_batches`), as FSDP2 requires."""
    rank, world = rank_world()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    sums: dict[str, torch.Tensor] = {}
    for idx in even_batches(len(items), rank, world, micro_batch_size):
        batch = collate([items[i] for i in idx] if idx is not None else items[:1])
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        parts = loss_fn(model, batch)
        if idx is None:
            continue  # a stand-in forward: this rank ran out of items, the others have not
        count += count_fn(batch)
        loss_sum += parts.loss_sum.double().cpu()
        for key, v in parts.sums.items():
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + v.double().cpu()
    keys = sorted(sums)
    # Every rank must take part in the all-reduce with the same keys, even with no items.
    keys = _agree_keys(keys)
    red = all_reduce(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)] + [sums.get(k, torch.zeros((), dtype=torch.float64)) for k in keys]))
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
