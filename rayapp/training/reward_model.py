"""`kind: reward_model` — a Bradley-Terry reward model from preference pairs (full or LoRA).

Reads top to bottom: load and encode the pairs on the driver (both preference formats; a bad row
stops the job before any worker starts), train a scalar head on the causal LM on Ray Train
workers with the shared step loop (units = pairs, loss -log sigmoid(r_chosen - r_rejected)),
report held-out pairwise accuracy (before and after), export model/ as a Hugging Face
``*ForSequenceClassification`` (num_labels=1) that the RL job's reward actors and a Serve
deployment load. The pair helpers here are shared with the DPO recipe.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayapp.training.common import (
    check_result,
    fit_in_worker,
    prepare_for_ray,
    prepare_output,
    write_json_atomic,
)


# -- preference pairs (shared with dpo.py) -------------------------------------------------------
def encode_pair(tokenizer, pair, max_seq_len: int, chat_template: str = "auto", overlong: str = "truncate") -> dict:
    """A PreferencePair as two Encoded conversations (prompt + chosen, prompt + rejected)."""
    from rayapp.data.formats import ChatExample
    from rayapp.data.tokenize import encode_example

    def enc(response: str, field: str):
        record = ChatExample(pair.prompt_messages + [{"role": "assistant", "content": response}], field)
        return encode_example(tokenizer, record, max_seq_len, chat_template, overlong)

    return {"chosen": enc(pair.chosen, "chosen"), "rejected": enc(pair.rejected, "rejected")}


def load_pair_splits(cfg, tokenizer) -> tuple[list[dict], list[dict] | None, dict]:
    """(train items, validation items or None, stats dict); bad rows raise DataError (file:line: field)."""
    from rayapp.data.formats import parse_preference
    from rayapp.data.loaders import load_records, split_indices

    d = cfg.data

    def parse(row: dict) -> dict:
        return encode_pair(tokenizer, parse_preference(row), cfg.model.max_seq_len, d.chat_template, d.overlong)

    train, train_stats = load_records(d.train, parse, d, "preference pairs")
    stats = {"train": _pair_stats(train, train_stats.to_dict())}
    val = None
    if d.validation:
        val, val_stats = load_records(d.validation, parse, d, "preference pairs")
        stats["validation"] = _pair_stats(val, val_stats.to_dict())
    elif d.validation_split > 0:
        keep, held = split_indices(len(train), d.validation_split, cfg.train.seed)
        train, val = [train[i] for i in keep], [train[i] for i in held]
        stats["validation"] = {"pairs": len(val), "source": f"{d.train} (validation_split={d.validation_split:g})"}
    return train, val, stats


def _pair_stats(items: list[dict], base: dict) -> dict:
    lengths = [len(it[k].input_ids) for it in items for k in ("chosen", "rejected")]
    return {
        "source": base.get("source"),
        "rows": base.get("rows"),
        "pairs": len(items),
        "dropped": base.get("dropped", 0),
        "tokens_mean": round(sum(lengths) / max(1, len(lengths)), 1),
        "tokens_max": max(lengths, default=0),
        "truncated": sum(1 for it in items for k in ("chosen", "rejected") if it[k].truncated),
    }


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows: input_ids / attention_mask / labels (2B, T); ``pairs`` = B.
    Precomputed reference log-probs, when present, as ``ref_chosen`` / ``ref_rejected`` (B,)."""
    import torch

    from rayapp.data.collate import collate_sft

    batch = collate_sft([it["chosen"] for it in items] + [it["rejected"] for it in items], pad_id)
    batch["pairs"] = len(items)
    if items and items[0].get("ref") is not None:
        batch["ref_chosen"] = torch.tensor([it["ref"][0] for it in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([it["ref"][1] for it in items], dtype=torch.float32)
    return batch


def count_pairs(batch) -> int:
    return int(batch["pairs"])


# -- the recipe --------------------------------------------------------------------------------
def validate(cfg) -> str:
    from rayapp.models.io import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    _, _, stats = load_pair_splits(cfg, tokenizer)
    return "\n".join(f"{split}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for split, s in stats.items())


def bt_loss(model, batch):
    """Bradley-Terry loss of the pairs, as a sum over pairs (the loop divides by the global count)."""
    from rayapp.algorithms.preference import bradley_terry_loss
    from rayapp.models.value_head import reward_scores
    from rayapp.training.loop import LossParts

    b = batch["pairs"]
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    loss, acc = bradley_terry_loss(scores[:b], scores[b:])
    margin = (scores[:b] - scores[b:]).detach().sum()
    return LossParts(loss_sum=loss * b, count=b, sums={"accuracy": acc.detach() * b, "margin": margin})


def reward_model_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import torch

    from rayapp.config.loader import load_job_dict
    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import load_reward_model, save_reward_model
    from rayapp.training.launch import worker_setup

    cfg = load_job_dict(config["job"])
    env = worker_setup(cfg.resources.cpus_per_worker)
    train_items = ray.get(config["train"])
    val_items = ray.get(config["val"]) if config["val"] is not None else None
    tokenizer = load_tokenizer(config["model_dir"])
    torch.manual_seed(cfg.train.seed)  # the fresh score head is identical on every rank
    model = load_reward_model(config["model_dir"], cfg.model.dtype, cfg.adapter, tokenizer.pad_token_id)
    model = prepare_for_ray(model, cfg.resources.strategy)
    pad_id = tokenizer.pad_token_id
    collate = lambda items: collate_pairs(items, pad_id)  # noqa: E731
    fit_in_worker(cfg, model, train_items=train_items, val_items=val_items, collate=collate, count_fn=count_pairs,
                  loss_fn=bt_loss, device=env["device"], unit="pairs", initial_eval=True)
    if env["rank"] == 0:
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        save_reward_model(inner.to("cpu"), tokenizer, Path(cfg.output_dir) / "model")


def run(cfg) -> dict:
    import json

    from rayapp.models.io import load_tokenizer, resolve_model
    from rayapp.runtime import ensure_ray
    from rayapp.training.launch import launch
    from rayapp.training.report import write_report

    t0 = time.perf_counter()
    out = prepare_output(cfg)
    model_dir = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    train, val, stats = load_pair_splits(cfg, tokenizer)
    write_json_atomic(out / "data_stats.json", stats)
    print(f"[{cfg.name}] {len(train)} training pairs, {len(val or [])} validation pairs; {cfg.resources.num_workers} worker(s)", flush=True)
    ray = ensure_ray()
    worker_config = {
        "job": cfg.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "train": ray.put(train),
        "val": ray.put(val) if val else None,
    }
    final = check_result(launch(reward_model_worker, worker_config, cfg), cfg)
    evaluation = {k: v for k, v in final.items() if k.startswith("val_") or k in ("loss", "accuracy", "step")}
    initial = out / "initial_eval.json"
    if initial.exists():
        evaluation.update({f"initial_{k}": v for k, v in json.loads(initial.read_text()).items()})
    evaluation["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "eval.json", evaluation)
    report = write_report(
        out,
        title=f"{cfg.name} (reward_model)",
        data_stats=stats,
        evaluation=evaluation,
        curves={"loss": "Bradley-Terry loss", "val_loss": "validation loss", "accuracy": "pairwise accuracy", "val_accuracy": "held-out pairwise accuracy"},
    )
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    if cfg.deploy.enabled:  # served on /v1/score by the reward deployment (rayapp.serving.reward)
        from rayapp.serving.reward import deploy_reward_model

        info = deploy_reward_model(str(out / "model"), cfg.deploy, cfg.deploy.name or cfg.name)
        summary.update({"endpoint": info.url, "served_model": info.model_name})
    return summary
