"""`kind: dpo` — direct preference optimisation on preference pairs (full or LoRA).

Reads top to bottom: load and encode the pairs on the driver (shared with the reward model
recipe), then on Ray Train workers: reference log-probs, the shared step loop with the DPO loss
(units = pairs), export model/ (and adapter/), eval.json with the held-out log-likelihood margin
of chosen over rejected before and after, report.html.

The reference is the starting policy unless ``reference_model`` names another one.
``reference: precompute`` scores every pair with it once before the first step (each rank its
share, then all-gathered) and keeps no second model; ``frozen`` keeps it and scores each batch.
With LoRA the reference is the base with the adapters disabled (no copy of the weights).
"""

from __future__ import annotations

import time

from rayapp.training.common import (
    build_model,
    check_result,
    export_model,
    fit_in_worker,
    maybe_deploy,
    prepare_for_ray,
    prepare_output,
    write_json_atomic,
)
from rayapp.training.reward_model import collate_pairs, count_pairs, load_pair_splits


def validate(cfg) -> str:
    from rayapp.training.reward_model import validate as validate_pairs

    return validate_pairs(cfg)


def pair_logps(model, batch) -> tuple:
    """Summed response log-probs of the chosen and rejected rows: (B,), (B,)."""
    from rayapp.algorithms.preference import sequence_logps

    b = batch["pairs"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["labels"])                    # (2B,)
    return logps[:b], logps[b:]


def make_dpo_loss(beta: float, label_smoothing: float, reference=None):
    """The loop's loss_fn; ``reference(batch) -> (ref_chosen, ref_rejected)`` when not precomputed."""
    import torch

    from rayapp.algorithms.preference import dpo_loss
    from rayapp.training.loop import LossParts

    def loss_fn(model, batch):
        chosen, rejected = pair_logps(model, batch)
        if "ref_chosen" in batch:
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with torch.no_grad():
                ref_c, ref_r = reference(batch)
        loss, rc, rr = dpo_loss(chosen, rejected, ref_c, ref_r, beta, label_smoothing)
        b = batch["pairs"]
        sums = {
            "reward_accuracy": (rc > rr).float().sum(),
            "reward_margin": (rc - rr).sum(),
            "logp_margin": (chosen - rejected).detach().sum(),  # log pi(chosen) - log pi(rejected)
        }
        return LossParts(loss_sum=loss * b, count=b, sums=sums)

    return loss_fn


def _reference_fn(cfg, config: dict, model, device):
    """(ref_chosen, ref_rejected) of a batch from the frozen reference."""
    import contextlib

    import torch

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if cfg.reference_model is None and cfg.adapter is not None:  # the base: adapters off
        return lambda batch: _with(inner.disable_adapter(), lambda: pair_logps(inner, batch))
    from rayapp.models.io import load_causal_lm

    ref = load_causal_lm(cfg.reference_model or config["model_dir"], cfg.model.dtype, cfg.model.trust_remote_code).to(device)
    ref.eval().requires_grad_(False)
    return lambda batch: _with(contextlib.nullcontext(), lambda: pair_logps(ref, batch))


def _with(ctx, fn):
    with ctx:
        return fn()


def precompute_reference(items: list[dict], reference, collate, micro_batch_size: int, device) -> list[dict]:
    """Every item with ``ref`` = (log ref(chosen), log ref(rejected)); each rank scores its share."""
    import torch
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(items), world))
    values: dict[int, tuple[float, float]] = {}
    with torch.no_grad():
        for k in range(0, len(mine), micro_batch_size):
            idx = mine[k : k + micro_batch_size]
            batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in collate([items[i] for i in idx]).items()}
            c, r = reference(batch)
            values.update({i: (float(a), float(b)) for i, a, b in zip(idx, c.tolist(), r.tolist(), strict=True)})
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, values)
        values = {k: v for part in gathered for k, v in part.items()}
    return [{**it, "ref": values[i]} for i, it in enumerate(items)]


def dpo_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import torch

    from rayapp.config.loader import load_job_dict
    from rayapp.models.io import load_tokenizer
    from rayapp.training.launch import worker_setup

    cfg = load_job_dict(config["job"])
    env = worker_setup(cfg.resources.cpus_per_worker)
    device = env["device"]
    train_items = ray.get(config["train"])
    val_items = ray.get(config["val"]) if config["val"] is not None else None
    tokenizer = load_tokenizer(config["model_dir"])
    model = prepare_for_ray(build_model(config["model_dir"], cfg), cfg.resources.strategy)
    pad_id = tokenizer.pad_token_id
    collate = lambda items: collate_pairs(items, pad_id)  # noqa: E731
    mb = cfg.train.micro_batch_size

    if cfg.reference == "precompute":
        if cfg.reference_model is None:  # the policy before its first step is the reference
            inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            reference = lambda batch: pair_logps(inner, batch)  # noqa: E731
            inner.eval()
        else:
            reference = _reference_fn(cfg, config, model, device)
        train_items = precompute_reference(train_items, reference, collate, mb, device)
        val_items = precompute_reference(val_items, reference, collate, mb, device) if val_items else None
        loss_fn = make_dpo_loss(cfg.beta, cfg.label_smoothing)
        del reference
    else:
        loss_fn = make_dpo_loss(cfg.beta, cfg.label_smoothing, _reference_fn(cfg, config, model, device))

    fit_in_worker(cfg, model, train_items=train_items, val_items=val_items, collate=collate, count_fn=count_pairs,
                  loss_fn=loss_fn, device=device, unit="pairs", initial_eval=True)
    export_model(model, tokenizer, cfg, env["rank"])


def run(cfg) -> dict:
    import json

    from rayapp.models.io import load_tokenizer, resolve_model
    from rayapp.runtime import ensure_ray
    from rayapp.training.launch import launch
    from rayapp.training.report import write_report

    t0 = time.perf_counter()
    out = prepare_output(cfg)
    model_dir = resolve_model(cfg.model.path)
    if cfg.reference_model:
        resolve_model(cfg.reference_model)  # fail on the driver when it does not exist
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val, stats = load_pair_splits(cfg, tokenizer)
    write_json_atomic(out / "data_stats.json", stats)
    print(f"[{cfg.name}] {len(train)} training pairs, {len(val or [])} validation pairs, beta {cfg.beta}, reference: {cfg.reference}", flush=True)
    ray = ensure_ray()
    worker_config = {
        "job": cfg.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "train": ray.put(train),
        "val": ray.put(val) if val else None,
    }
    final = check_result(launch(dpo_worker, worker_config, cfg), cfg)
    evaluation = {k: v for k, v in final.items() if k.startswith("val_") or k in ("loss", "reward_accuracy", "logp_margin", "step")}
    initial = out / "initial_eval.json"
    if initial.exists():
        evaluation.update({f"initial_{k}": v for k, v in json.loads(initial.read_text()).items()})
    evaluation["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "eval.json", evaluation)
    report = write_report(
        out,
        title=f"{cfg.name} (dpo)",
        data_stats=stats,
        evaluation=evaluation,
        curves={"loss": "DPO loss", "val_loss": "validation DPO loss"},
    )
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    if cfg.adapter is not None and (out / "adapter").exists():
        summary["adapter"] = str(out / "adapter")
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    summary.update(maybe_deploy(cfg, out / "model"))
    return summary
