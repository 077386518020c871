"""`kind: sft` — supervised tuning (full or LoRA) of a causal LM on text / chat / code data.

Reads top to bottom: load and validate data on the driver (a bad row stops the job before any
worker starts), train on Ray Train workers with the shared step loop (loss on response tokens
only), export model/ (and adapter/), write eval.json and report.html, deploy if asked.
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
    from rayapp.training.loop import LossParts

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum, n = token_nll_sum(logits, batch["labels"])
    correct, _ = next_token_accuracy_counts(logits.detach(), batch["labels"])
    return LossParts(loss_sum=loss_sum, count=int(n), sums={"accuracy": correct.float()})


def count_supervised(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def sft_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray

    from rayapp.config.loader import load_job_dict
    from rayapp.data.collate import collate_sft
    from rayapp.models.io import load_tokenizer
    from rayapp.training.launch import worker_setup

    cfg = load_job_dict(config["job"])
    env = worker_setup(cfg.resources.cpus_per_worker)
    train_items = ray.get(config["train"])
    val_items = ray.get(config["val"]) if config["val"] is not None else None
    tokenizer = load_tokenizer(config["model_dir"])
    model = prepare_for_ray(build_model(config["model_dir"], cfg), cfg.resources.strategy)
    pad_id = tokenizer.pad_token_id
    fit_in_worker(cfg, model, train_items=train_items, val_items=val_items, collate=lambda items: collate_sft(items, pad_id),
                  count_fn=count_supervised, loss_fn=sft_loss, device=env["device"])
    export_model(model, tokenizer, cfg, env["rank"])


def run(cfg) -> dict:
    from rayapp.models.io import load_tokenizer, resolve_model
    from rayapp.runtime import ensure_ray
    from rayapp.training.launch import launch
    from rayapp.training.report import write_report

    t0 = time.perf_counter()
    out = prepare_output(cfg)
    model_dir = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val = load_data(cfg, tokenizer)
    print(f"[{cfg.name}] dataset stats (train)\n{train.stats.format()}", flush=True)
    stats = {"train": train.stats.to_dict(), "validation": val.stats.to_dict() if val else None}
    write_json_atomic(out / "data_stats.json", stats)
    print(
        f"[{cfg.name}] {cfg.resources.num_workers} worker(s), global batch {cfg.train.global_batch_size} = "
        f"micro {cfg.train.micro_batch_size} x {cfg.resources.num_workers} workers x {cfg.grad_accum_steps} accumulation",
        flush=True,
    )
    if cfg.deploy.enabled:
        from rayapp.serving.local_head import ensure_local_head

        ensure_local_head()
    ray = ensure_ray()
    worker_config = {
        "job": cfg.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "train": ray.put(train.examples),
        "val": ray.put(val.examples) if val else None,
    }
    final = check_result(launch(sft_worker, worker_config, cfg), cfg)
    evaluation = {k: v for k, v in final.items() if k.startswith("val_") or k in ("loss", "accuracy", "step")}
    evaluation["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "eval.json", evaluation)
    report = write_report(out, title=f"{cfg.name} (sft)", data_stats=stats, evaluation=evaluation)
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    if cfg.adapter is not None and (out / "adapter").exists():
        summary["adapter"] = str(out / "adapter")
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    summary.update(maybe_deploy(cfg))
    return summary
