"""Small pieces every recipe repeats: output directory set-up, model building and export in workers,
result handling, eval.json, and deploying the result when ``deploy.enabled``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rayapp.config import dump_config
from rayapp.errors import UserError


class TrainingFailed(UserError):
    pass


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def prepare_output(cfg) -> Path:
    """Create output_dir and write config.resolved.yaml (every default filled in)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.resolved.yaml", dump_config(cfg))
    return out


def build_model(model_dir: str, cfg):
    """Load the model to train in a worker: the base, then LoRA when ``adapter`` is set."""
    from rayapp.models.io import load_causal_lm
    from rayapp.models.lora import apply_lora

    model = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    if cfg.adapter is not None:
        model = apply_lora(model, cfg.adapter)
    return model


def prepare_for_ray(model, strategy: str):
    """Move to the worker's device and wrap for data parallelism (DDP) or sharding (FSDP)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy=strategy)


def fit_in_worker(cfg, model, *, train_items, val_items, collate, count_fn, loss_fn, device, unit: str = "tok",
                  initial_eval: bool = False, after_step=None, extra_modules=None):
    """The training part every Ray Train recipe shares: AdamW over the trainable parameters (peak
    learning rate and weight decay from ``cfg.train``), Ray Train checkpoints and reports, metrics
    in output_dir/metrics.jsonl, then the shared loop :func:`rayapp.training.loop.fit`.

    ``initial_eval``: write output_dir/initial_eval.json with the validation metrics before the
    first step (not on resume), for before/after comparisons. ``after_step()`` runs after every
    optimizer step (an EMA teacher update); ``extra_modules`` are checkpointed with the model.
    """
    import torch

    from rayapp.training.launch import RayReporter
    from rayapp.training.loop import evaluate, fit

    mb = cfg.train.micro_batch_size
    reporter = RayReporter()
    if initial_eval and val_items and reporter.latest_checkpoint() is None:
        before = evaluate(model, val_items, collate, count_fn, loss_fn, mb, device)  # every rank takes part
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            write_json_atomic(Path(cfg.output_dir) / "initial_eval.json", before)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.peak_lr, weight_decay=cfg.train.weight_decay
    )
    if after_step is not None:
        optimizer.register_step_post_hook(lambda *_: after_step())
    return fit(
        model=model, optimizer=optimizer, train_items=train_items, val_items=val_items, collate=collate,
        count_fn=count_fn, loss_fn=loss_fn, cfg=cfg.train, micro_batch_size=mb, reporter=reporter,
        metrics_path=Path(cfg.output_dir) / "metrics.jsonl", name=cfg.name, unit=unit, device=device,
        extra_modules=extra_modules,
    )


def export_model(model, tokenizer, cfg, rank: int) -> dict[str, str]:
    """Write model/ (and adapter/ for LoRA) from the trained model; rank 0 writes, every rank calls."""
    import torch

    from rayapp.models.io import save_model_atomic
    from rayapp.models.lora import export_lora

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if cfg.resources.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return {}
        out = Path(cfg.output_dir) / "model"
        tmp = out.with_name(f".model.tmp-{os.getpid()}")
        inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        return {"model": str(out)}
    if rank != 0:
        return {}
    inner = inner.to("cpu")
    if cfg.adapter is not None:
        return {k: str(v) for k, v in export_lora(inner, tokenizer, cfg.output_dir, cfg.adapter.export).items()}
    return {"model": str(save_model_atomic(inner, tokenizer, Path(cfg.output_dir) / "model"))}


def check_result(result, cfg) -> dict:
    """Raise a readable error when Ray Train failed; return the final metrics."""
    if result.error is not None:
        err = result.error
        raise TrainingFailed(
            f"job '{cfg.name}' failed in the training workers: {type(err).__name__}: {err}\n"
            f"  checkpoints so far are in {Path(cfg.output_dir) / 'checkpoints'}; re-running the job resumes from the latest"
        ) from err
    return dict(result.metrics or {})


def maybe_deploy(cfg, model_dir: Path | None = None) -> dict:
    """Serve the result when ``deploy.enabled``: ``model_dir`` if given, else what the job left in
    output_dir (model/, or adapter/ on its base model). Returns {endpoint, served_model}."""
    if not cfg.deploy.enabled:
        return {}
    from rayapp.serving.deploy import deploy_job_output, deploy_model

    name = cfg.deploy.name or cfg.name
    if model_dir is not None:
        info = deploy_model(str(model_dir), {}, cfg.deploy, name)
    else:
        info = deploy_job_output(cfg.output_dir, cfg.deploy, name)
    print(f"[{cfg.name}] serving model '{info.model_name}' at {info.url}", flush=True)
    return {"endpoint": info.url, "served_model": info.model_name}
