"""The start and the ending every training recipe shares, all through the job's output store
(:func:`rayapp.storage.open_output`: a local path, a shared mount, or an ``s3://`` / ``gs://`` URI).

``prepare_output(cfg)`` first: open the store (a wrong bucket, endpoint or credentials fail
here, before any work), write config.resolved.yaml, and, when the job will serve its result
(``deploy.enabled``) and no ``RAY_ADDRESS`` is set, move the job onto the persistent local Ray head
(:func:`rayapp.serving.local_head.ensure_local_head`) before anything starts Ray in this process:
an in-process cluster, and every deployment on it, dies when ``rayapp run`` exits. It returns the
store; the recipe writes what it has to say (data_stats.json) through it and passes it to
``launch`` and ``finish``.

``export_model(model, tokenizer, cfg, w)`` in the workers, every rank: the full weights gathered
(:func:`rayapp.training.parallel.full_state_dict`: the same for none, DDP and FSDP2; LoRA merged)
into model/, and the LoRA tensors into adapter/, published whole (``store.publish_dir``).

``finish(cfg, evaluation, store=...)`` last: eval.json (with the initial_eval.json a recipe measured
before its first step, when there is one), report.html and its plots, the summary ``rayapp run``
prints, and the deployment when ``deploy.enabled``: model/ when there is one, else adapter/ on its
base model (a LoRA job with ``adapter.export: adapter``); a reward model on ``/v1/score``.
"""

from __future__ import annotations

import os
import time

from rayapp.config.loader import RESOLVED_CONFIG, dump_config
from rayapp.fileio import replace_dir_atomic


def prepare_output(cfg):
    """Open output_dir as an OutputStore and write config.resolved.yaml; see the module docstring
    for the Ray head. Returns the store."""
    from rayapp.storage import open_output

    store = open_output(cfg.output_dir)
    store.write_text(RESOLVED_CONFIG, dump_config(cfg))
    if cfg.deploy.enabled and not os.environ.get("RAY_ADDRESS"):
        from rayapp.serving.local_head import ensure_local_head

        address = ensure_local_head()
        print(f"[{cfg.name}] using the local Ray head at {address}: the deployment outlives this command", flush=True)
    return store


def export_model(model, tokenizer, cfg, w, *, adapter: bool = True) -> dict[str, str]:
    """Write model/ (and adapter/ for LoRA, as ``adapter.export`` says) from the trained model and
    publish them in the output store; returns {name: URI or path} on rank 0, {} elsewhere.

    Every rank calls it: gathering the shards of an FSDP2 model is a collective. ``model`` is the
    prepared module (DDP, FSDP2 or plain), or the language model inside a wrapper (a value head, a
    distillation projector). ``adapter=False``: model/ only, LoRA merged (the reward model)."""
    from rayapp.models.io import unwrap as unwrap_ddp
    from rayapp.training.parallel import full_adapter_state_dict, full_state_dict, unwrap

    export = cfg.adapter.export if (cfg.adapter is not None and adapter) else "merged"
    adapter_state = full_adapter_state_dict(model) if export in ("adapter", "both") else None
    state = full_state_dict(model) if export in ("merged", "both") else None
    if w.rank != 0:
        return {}
    written = {}
    if adapter_state is not None:
        peft_model = unwrap_ddp(model)

        def write_adapter(d) -> None:
            peft_model.save_pretrained(d, state_dict=adapter_state, safe_serialization=True)
            tokenizer.save_pretrained(d)

        replace_dir_atomic(w.store.path("adapter"), write_adapter)
        written["adapter"] = w.store.publish_dir("adapter")
    if state is not None:
        hf = unwrap(model)

        def write_model(d) -> None:
            hf.save_pretrained(d, state_dict=state, safe_serialization=True)  # it pops the tensors of the dict
            tokenizer.save_pretrained(d)

        replace_dir_atomic(w.store.path("model"), write_model)
        written["model"] = w.store.publish_dir("model")
    return written


def write_initial_evaluation(w, model, items: list | None, collate, count_fn, loss_fn) -> None:
    """Validation metrics before the first step (not on resume) into initial_eval.json, which
    :func:`finish` reports as ``initial_*``, for before/after comparisons. Every rank calls this."""
    from rayapp.training.loop import evaluate

    if not items or w.reporter.latest_checkpoint() is not None:
        return
    before = evaluate(model, items, collate, count_fn, loss_fn, w.cfg.train.micro_batch_size, w.device)
    if w.rank == 0:
        w.store.write_json("initial_eval.json", before)


def final_evaluation(final: dict, keys: tuple[str, ...] = ("loss", "step")) -> dict:
    """The validation metrics (``val_*``) and ``keys`` of the metrics a run reported last."""
    return {k: v for k, v in final.items() if k.startswith("val_") or k in keys}


def finish(cfg, evaluation: dict, *, store, started: float, title: str, data_stats: dict | None = None,
           curves: dict[str, str] | None = None, sections: list[tuple[str, str]] | None = None) -> dict:
    """Write eval.json and report.html (with its plots) through ``store``, deploy when asked; return
    the summary ``rayapp run`` prints.

    ``evaluation``: the recipe's own numbers (it picks them); the initial_eval.json a recipe wrote
    before its first step joins as ``initial_*``, and ``wall_time_s`` counts from ``started``."""
    from rayapp.report import write_report

    evaluation = dict(evaluation)
    if store.exists("initial_eval.json"):
        evaluation.update({f"initial_{k}": v for k, v in store.read_json("initial_eval.json").items()})
    evaluation["wall_time_s"] = round(time.perf_counter() - started, 1)
    store.write_json("eval.json", evaluation)
    store.pull("metrics.jsonl")  # the workers' rows, for the plots
    report = write_report(store.local, title=title, data_stats=data_stats, evaluation=evaluation, sections=sections,
                          curves=curves)
    store.push(report.name, *(["plots"] if store.path("plots").is_dir() else []))
    summary = {"output_dir": store.uri, "model": store.uri_of("model"), "report": store.uri_of(report.name)}
    if cfg.adapter is not None and store.is_complete("adapter"):
        summary["adapter"] = store.uri_of("adapter")
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    summary.update(deploy_result(cfg))
    store.close()
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
