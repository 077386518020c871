"""The start and the ending every training recipe shares.

``prepare_output(cfg)`` first: create output_dir, write config.resolved.yaml, and, when the job
will serve its result (``deploy.enabled``) and no ``RAY_ADDRESS`` is set, move the job onto the
persistent local Ray head (:func:`rayapp.serving.local_head.ensure_local_head`) before anything
starts Ray in this process: an in-process cluster, and every deployment on it, dies when
``rayapp run`` exits.

``export_model(...)`` in the workers: model/ (and adapter/ for LoRA).

``finish(cfg, evaluation, ...)`` last: eval.json (with the initial_eval.json a recipe measured
before its first step, when there is one), report.html, the summary ``rayapp run`` prints, and the
deployment when ``deploy.enabled``: model/ when there is one, else adapter/ on its base model (a
LoRA job with ``adapter.export: adapter``); a reward model on ``/v1/score``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rayapp.config.loader import write_resolved_config
from rayapp.fileio import write_json_atomic


def prepare_output(cfg) -> Path:
    """Create output_dir and write config.resolved.yaml; see the module docstring for the Ray head."""
    out = Path(cfg.output_dir)
    write_resolved_config(cfg, out)
    if cfg.deploy.enabled and not os.environ.get("RAY_ADDRESS"):
        from rayapp.serving.local_head import ensure_local_head

        address = ensure_local_head()
        print(f"[{cfg.name}] using the local Ray head at {address}: the deployment outlives this command", flush=True)
    return out


def export_model(model, tokenizer, cfg, rank: int) -> dict[str, str]:
    """Write model/ (and adapter/ for LoRA) from the trained model; rank 0 writes, every rank calls
    (gathering an FSDP model's full state is a collective)."""
    from rayapp.fileio import replace_dir_atomic
    from rayapp.models.io import save_model_atomic, unwrap
    from rayapp.models.lora import export_lora

    inner = unwrap(model)
    out = Path(cfg.output_dir)
    if cfg.resources.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return {}

        def write(tmp: Path) -> None:
            inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        return {"model": str(replace_dir_atomic(out / "model", write))}
    if rank != 0:
        return {}
    inner = inner.to("cpu")
    if cfg.adapter is not None:
        return {k: str(v) for k, v in export_lora(inner, tokenizer, out, cfg.adapter.export).items()}
    return {"model": str(save_model_atomic(inner, tokenizer, out / "model"))}


def write_initial_evaluation(w, model, items: list | None, collate, count_fn, loss_fn) -> None:
    """Validation metrics before the first step (not on resume) into initial_eval.json, which
    :func:`finish` reports as ``initial_*``, for before/after comparisons. Every rank calls this."""
    from rayapp.training.loop import evaluate

    if not items or w.reporter.latest_checkpoint() is not None:
        return
    before = evaluate(model, items, collate, count_fn, loss_fn, w.cfg.train.micro_batch_size, w.device)
    if w.rank == 0:
        write_json_atomic(Path(w.cfg.output_dir) / "initial_eval.json", before)


def final_evaluation(final: dict, keys: tuple[str, ...] = ("loss", "step")) -> dict:
    """The validation metrics (``val_*``) and ``keys`` of the metrics a run reported last."""
    return {k: v for k, v in final.items() if k.startswith("val_") or k in keys}


def finish(cfg, evaluation: dict, *, started: float, title: str, data_stats: dict | None = None,
           curves: dict[str, str] | None = None, sections: list[tuple[str, str]] | None = None) -> dict:
    """Write eval.json and report.html, deploy when asked; return the summary ``rayapp run`` prints.

    ``evaluation``: the recipe's own numbers (it picks them); the initial_eval.json a recipe wrote
    before its first step joins as ``initial_*``, and ``wall_time_s`` counts from ``started``."""
    from rayapp.report import write_report

    out = Path(cfg.output_dir)
    evaluation = dict(evaluation)
    initial = out / "initial_eval.json"
    if initial.exists():
        evaluation.update({f"initial_{k}": v for k, v in json.loads(initial.read_text()).items()})
    evaluation["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "eval.json", evaluation)
    report = write_report(out, title=title, data_stats=data_stats, evaluation=evaluation, sections=sections, curves=curves)
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    if cfg.adapter is not None and (out / "adapter").exists():
        summary["adapter"] = str(out / "adapter")
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    summary.update(deploy_result(cfg))
    return summary


def deploy_result(cfg) -> dict:
    """Serve what the job left in output_dir when ``deploy.enabled``: model/, else adapter/ on its
    base; a reward model (kind: reward_model) on /v1/score. Returns {endpoint, served_model}."""
    if not cfg.deploy.enabled:
        return {}
    from rayapp.serving.deploy import deploy_job_output, deploy_reward_model

    name = cfg.deploy.name or cfg.name
    if cfg.kind == "reward_model":
        info = deploy_reward_model(cfg.output_dir, cfg.deploy, name)
    else:
        info = deploy_job_output(cfg.output_dir, cfg.deploy, name)
    print(f"[{cfg.name}] serving model '{info.model_name}' at {info.url}", flush=True)
    return {"endpoint": info.url, "served_model": info.model_name}
