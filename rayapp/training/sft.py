"""`kind: sft` — supervised tuning (full or LoRA) of a causal LM on text / chat / code data.

Reads top to bottom: load and validate data on the driver (a bad row stops the job before any
worker starts), train on Ray Train workers with the shared step loop (loss on response tokens
only), export model/ (and adapter/), then the shared ending: eval.json, report.html, deploy if
asked.
"""

from __future__ import annotations

import time

from rayapp.training.launch import build_model, launch, worker_context
from rayapp.training.loop import LossParts, count_supervised
from rayapp.training.outputs import export_model, final_evaluation, finish, prepare_output


def load_data(cfg, tokenizer):
    """(train, validation or None) as SFTDatasets; raises DataError naming file:line:field for bad rows."""
    from rayapp.data.sft import load_sft_splits

    return load_sft_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)


def validate(cfg) -> str:
    from rayapp.models.io import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    train, val = load_data(cfg, tokenizer)
    text = train.stats.format()
    if val is not None:
        text += f"\n{val.stats.format()}"
    return text


def sft_loss(model, batch):
    """Token-level cross-entropy on supervised (response) tokens, as sums for global normalisation."""
    from rayapp.algorithms.sft import next_token_accuracy_counts, token_nll_sum
    from rayapp.data.packing import lm_inputs

    logits = model(**lm_inputs(batch)).logits
    loss_sum, n = token_nll_sum(logits, batch["labels"])
    correct, _ = next_token_accuracy_counts(logits.detach(), batch["labels"])
    return LossParts(loss_sum=loss_sum, count=int(n), sums={"accuracy": correct.float()})


def sft_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from rayapp.data.collate import collate_sft
    from rayapp.data.packing import collate_packed
    from rayapp.models.io import load_tokenizer

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    tokenizer = load_tokenizer(data["model_dir"])
    model = w.prepare(build_model(data["model_dir"], cfg))
    pad_id, capacity = tokenizer.pad_token_id, cfg.model.max_seq_len
    collate = (lambda items: collate_packed(items, pad_id, capacity)) if cfg.train.packing else (lambda items: collate_sft(items, pad_id))
    w.fit(model, train_items=data["train"], val_items=data["val"], collate=collate,
          count_fn=count_supervised, loss_fn=sft_loss)
    export_model(model, tokenizer, cfg, w)


def run(cfg) -> dict:
    from rayapp.models.io import load_tokenizer, resolve_model_info

    t0 = time.perf_counter()
    store = prepare_output(cfg)
    model = resolve_model_info(cfg.model.path)
    model_dir = model.path
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val = load_data(cfg, tokenizer)
    print(f"{cfg.name}: dataset stats (train)\n{train.stats.format()}", flush=True)  # the log only (rayapp.console)
    stats = {"train": train.stats.to_dict(), "validation": val.stats.to_dict() if val else None}
    store.write_json("data_stats.json", stats)
    print(
        f"[{cfg.name}] {len(train)} examples ({train.stats.supervised_tokens} supervised tokens); {cfg.resources.num_workers} worker(s), global batch {cfg.train.global_batch_size} = "
        f"micro {cfg.train.micro_batch_size} x {cfg.resources.num_workers} workers x {cfg.grad_accum_steps} accumulation",
        flush=True,
    )
    # Workers resolve the model themselves (a built-in name is built on each node; a directory must
    # be on a path every node sees).
    final = launch(sft_worker, cfg, store=store, model_dir=model.pinned_ref, train=train.examples,
                   val=val.examples if val else None)
    return finish(cfg, final_evaluation(final, ("loss", "accuracy", "step")), store=store, started=t0,
                  title=f"{cfg.name} (sft)", data_stats=stats)
