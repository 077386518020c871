"""`kind: dpo` — direct preference optimisation on preference pairs (full or LoRA).

Reads top to bottom: load and encode the pairs on the driver (``rayapp.data.preference``, as the
reward model recipe does), then on Ray Train workers: reference log-probs, the shared step loop
with the DPO loss (units = pairs), export model/ (and adapter/), then the shared ending: eval.json
with the held-out log-likelihood margin of chosen over rejected before and after, report.html,
deploy if asked.

The reference is the starting policy unless ``reference_model`` names another one.
``reference: precompute`` scores every pair with it once before the first step (each rank its
share, then all-gathered) and keeps no second model; ``frozen`` keeps it and scores each batch.
With LoRA the reference is the base with the adapters disabled (no copy of the weights).
"""

from __future__ import annotations

import contextlib
import time

from rayapp.data.preference import collate_pairs, count_pairs, format_pair_stats, load_pair_splits
from rayapp.training.launch import build_model, launch, worker_context
from rayapp.training.loop import LossParts, even_batches, rank_world
from rayapp.training.outputs import (
    export_model,
    final_evaluation,
    finish,
    prepare_output,
    write_initial_evaluation,
)


def validate(cfg) -> str:
    from rayapp.models.io import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    _, _, stats = load_pair_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)
    return format_pair_stats(stats)


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


def frozen_reference(cfg, model, model_dir: str, device):
    """``reference(batch) -> (ref_chosen, ref_rejected)`` from the frozen reference: with LoRA and no
    ``reference_model`` the base with the adapters disabled, else reference_model (default the
    starting policy) loaded once more."""
    import torch

    from rayapp.models.io import load_causal_lm, unwrap

    if cfg.reference_model is None and cfg.adapter is not None:  # the base: adapters off
        inner = unwrap(model)
        context, ref = inner.disable_adapter, inner
    else:
        ref = load_causal_lm(cfg.reference_model or model_dir, cfg.model.dtype, cfg.model.trust_remote_code).to(device)
        ref.eval().requires_grad_(False)
        context = contextlib.nullcontext

    def reference(batch):
        with torch.no_grad(), context():
            return pair_logps(ref, batch)

    return reference


def precompute_reference(items: list[dict], reference, collate, micro_batch_size: int, device) -> list[dict]:
    """Every item with ``ref`` = (log ref(chosen), log ref(rejected)); each rank scores its share."""
    import torch
    import torch.distributed as dist

    rank, world = rank_world()
    values: dict[int, tuple[float, float]] = {}
    with torch.no_grad():
        # The same number of forwards on every rank (a stand-in batch where a rank has run out): under
        # FSDP2 each forward is a collective.
        for idx in even_batches(len(items), rank, world, micro_batch_size):
            batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in collate([items[i] for i in idx or [0]]).items()}
            c, r = reference(batch)
            if idx is None:
                continue
            values.update({i: (float(a), float(b)) for i, a, b in zip(idx, c.tolist(), r.tolist(), strict=True)})
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, values)
        values = {k: v for part in gathered for k, v in part.items()}
    return [{**it, "ref": values[i]} for i, it in enumerate(items)]


def dpo_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from rayapp.models.io import load_tokenizer, unwrap

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    tokenizer = load_tokenizer(data["model_dir"])
    model = w.prepare(build_model(data["model_dir"], cfg, dropout=False))  # reference and policy passes alike
    pad_id = tokenizer.pad_token_id
    collate = lambda items: collate_pairs(items, pad_id)  # noqa: E731
    train_items, val_items = data["train"], data["val"]
    mb = cfg.train.micro_batch_size

    if cfg.reference == "precompute":
        if cfg.reference_model is None:  # the policy before its first step is the reference
            inner = unwrap(model).eval()
            reference = lambda batch: pair_logps(inner, batch)  # noqa: E731
        else:
            reference = frozen_reference(cfg, model, data["model_dir"], w.device)
        train_items = precompute_reference(train_items, reference, collate, mb, w.device)
        val_items = precompute_reference(val_items, reference, collate, mb, w.device) if val_items else None
        loss_fn = make_dpo_loss(cfg.beta, cfg.label_smoothing)
        del reference
    else:
        loss_fn = make_dpo_loss(cfg.beta, cfg.label_smoothing, frozen_reference(cfg, model, data["model_dir"], w.device))

    write_initial_evaluation(w, model, val_items, collate, count_pairs, loss_fn)
    w.fit(model, train_items=train_items, val_items=val_items, collate=collate, count_fn=count_pairs, loss_fn=loss_fn, unit="pairs")
    export_model(model, tokenizer, cfg, w)


def run(cfg) -> dict:
    from rayapp.models.io import load_tokenizer, resolve_model, resolve_model_info

    t0 = time.perf_counter()
    store = prepare_output(cfg)
    model = resolve_model_info(cfg.model.path)
    model_dir = model.path
    if cfg.reference_model:
        resolve_model(cfg.reference_model)  # fail on the driver when it does not exist
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val, stats = load_pair_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)
    store.write_json("data_stats.json", stats)
    print(f"[{cfg.name}] {len(train)} training pairs, {len(val or [])} validation pairs, beta {cfg.beta}, reference: {cfg.reference}", flush=True)
    final = launch(dpo_worker, cfg, store=store, model_dir=model.pinned_ref, train=train, val=val)
    return finish(cfg, final_evaluation(final, ("loss", "reward_accuracy", "logp_margin", "step")), store=store, started=t0,
                  title=f"{cfg.name} (dpo)", data_stats=stats, curves={"loss": "DPO loss", "val_loss": "validation DPO loss"})
