"""`kind: reward_model` — a Bradley-Terry reward model from preference pairs (full or LoRA).

Reads top to bottom: load and encode the pairs on the driver (both preference formats; a bad row
stops the job before any worker starts), train a scalar head on the causal LM on Ray Train
workers with the shared step loop (units = pairs, loss -log sigmoid(r_chosen - r_rejected)),
report held-out pairwise accuracy (before and after), export model/ as a Hugging Face
``*ForSequenceClassification`` (num_labels=1) that the RL job's reward actors and a Serve
deployment (``/v1/score``) load.
"""

from __future__ import annotations

import time

from rayapp.data.preference import collate_pairs, count_pairs, format_pair_stats, load_pair_splits
from rayapp.training.launch import launch, worker_context
from rayapp.training.loop import LossParts
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


def bt_loss(model, batch):
    """Bradley-Terry loss of the pairs, as a sum over pairs (the loop divides by the global count)."""
    from rayapp.algorithms.preference import bradley_terry_loss
    from rayapp.models.value_head import reward_scores

    b = batch["pairs"]
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    loss, acc = bradley_terry_loss(scores[:b], scores[b:])
    margin = (scores[:b] - scores[b:]).detach().sum()
    return LossParts(loss_sum=loss * b, count=b, sums={"accuracy": acc.detach() * b, "margin": margin})


def reward_model_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import torch

    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import load_reward_model

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    tokenizer = load_tokenizer(data["model_dir"])
    torch.manual_seed(cfg.train.seed)  # the fresh score head is identical on every rank
    model = w.prepare(load_reward_model(data["model_dir"], cfg.model.dtype, cfg.adapter, tokenizer.pad_token_id))
    pad_id = tokenizer.pad_token_id
    collate = lambda items: collate_pairs(items, pad_id)  # noqa: E731
    write_initial_evaluation(w, model, data["val"], collate, count_pairs, bt_loss)
    w.fit(model, train_items=data["train"], val_items=data["val"], collate=collate, count_fn=count_pairs, loss_fn=bt_loss,
          unit="pairs")
    export_model(model, tokenizer, cfg, w, adapter=False)  # a plain *ForSequenceClassification, LoRA merged


def run(cfg) -> dict:
    from rayapp.models.io import load_tokenizer, resolve_model_info

    t0 = time.perf_counter()
    store = prepare_output(cfg)
    model = resolve_model_info(cfg.model.path)
    model_dir = model.path
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val, stats = load_pair_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)
    store.write_json("data_stats.json", stats)
    print(f"[{cfg.name}] {len(train)} training pairs, {len(val or [])} validation pairs; {cfg.resources.num_workers} worker(s)", flush=True)
    final = launch(reward_model_worker, cfg, store=store, model_dir=model.pinned_ref, train=train, val=val)
    curves = {"loss": "Bradley-Terry loss", "val_loss": "validation loss", "accuracy": "pairwise accuracy",
              "val_accuracy": "held-out pairwise accuracy"}
    return finish(cfg, final_evaluation(final, ("loss", "accuracy", "step")), store=store, started=t0, title=f"{cfg.name} (reward_model)",
                  data_stats=stats, curves=curves)
