"""All of Ray Train, for every training recipe: scaling, storage, failures, checkpoints, the payload.

``launch(worker_fn, cfg, **payload)`` runs ``worker_fn(config)`` on ``resources.num_workers`` Ray
Train workers (gloo on CPU, NCCL on GPUs) with checkpoints under ``output_dir/checkpoints`` (kept
by Ray Train; a re-run of the same job finds them and resumes, and ``resources.max_failures``
restarts a lost worker group from the latest one). Each payload value goes into the object store
once (``ray.put``). Inside the worker, ``worker_context(config)`` gives back the job config, the
payload, this worker's rank / world / device, the Reporter the step loop talks to, and
``prepare(model)`` (DDP or FSDP). With ``in_process=True`` the same worker function runs in this
process instead, with a :class:`LocalReporter` keeping checkpoints in the same place (benches,
notebooks, tests): no Ray at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayapp.errors import UserError
from rayapp.training.loop import LocalReporter, LoopResult, Reporter, fit

CHECKPOINT_RUN_NAME = "checkpoints"


class TrainingFailed(UserError):
    pass


class RayReporter:
    """The loop's Reporter inside a Ray Train worker."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=f"step_{metrics['step']:06d}",
            )
        else:
            ray.train.report(metrics)

    def latest_checkpoint(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Local storage: the checkpoint directory is readable in place.
        return ckpt.to_directory() if not os.path.isdir(ckpt.path) else ckpt.path


@dataclass
class WorkerContext:
    """What a worker function works with: ``cfg`` and ``payload`` as the driver gave them."""

    cfg: Any
    payload: dict[str, Any]
    rank: int
    world: int
    device: Any  # torch.device
    reporter: Reporter
    in_process: bool = False

    def prepare(self, model):
        """Move ``model`` to this worker's device and wrap it for data parallelism (DDP) or sharding
        (FSDP) as ``resources.strategy`` says; in a single process only the move."""
        if self.in_process:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy=self.cfg.resources.strategy)

    def fit(self, model, **loop_args) -> LoopResult:
        """The shared step loop (:func:`rayapp.training.loop.fit`) with this job's settings: the train
        section, the reporter, output_dir/metrics.jsonl, the job name and the device."""
        t = self.cfg.train
        return fit(model=model, cfg=t, micro_batch_size=t.micro_batch_size, reporter=self.reporter,
                   metrics_path=Path(self.cfg.output_dir) / "metrics.jsonl", name=self.cfg.name, device=self.device, **loop_args)


def worker_context(config: dict) -> WorkerContext:
    """Called first by every worker function: the job config and payload, torch threads, device."""
    import torch

    from rayapp.config.loader import load_job_dict

    cfg = load_job_dict(config["job"])
    if "reporter" in config:  # in process: launch(..., in_process=True) made the reporter
        device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
        return WorkerContext(cfg, dict(config["payload"]), 0, 1, device, config["reporter"], in_process=True)
    import ray
    import ray.train
    import ray.train.torch

    # Ray Train logs every report at INFO on the console; our progress line says what matters.
    level = os.environ.get("RAYAPP_TRAIN_LOG_LEVEL", "WARNING")
    for name in ["ray.train", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.train.")]]:
        logging.getLogger(name).setLevel(level)
    ctx = ray.train.get_context()
    local = max(1, ctx.get_local_world_size())
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker), (os.cpu_count() or 1) // local))
    payload = {k: ray.get(ref) for k, ref in config["payload"].items()}
    return WorkerContext(cfg, payload, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), RayReporter())


def build_model(model_dir: str, cfg):
    """The model a worker trains: the base from ``model_dir``, then LoRA when ``adapter`` is set."""
    from rayapp.models.io import load_causal_lm
    from rayapp.models.lora import apply_lora

    model = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    if cfg.adapter is not None:
        model = apply_lora(model, cfg.adapter)
    return model


def launch(worker_fn, cfg, *, in_process: bool = False, **payload) -> dict:
    """Run ``worker_fn`` for the training job ``cfg`` and return the metrics it reported last.

    ``payload``: the values the workers need (data, model directories, actor handles), each put
    into Ray's object store once; the worker reads them from ``worker_context(config).payload``.
    ``in_process``: run the worker function here, with no Ray (see the module docstring).
    Raises :class:`TrainingFailed` naming the job and where its checkpoints are."""
    job = cfg.model_dump(mode="json", by_alias=True)
    if in_process:
        reporter = LocalReporter(Path(cfg.output_dir) / CHECKPOINT_RUN_NAME)
        try:
            worker_fn({"job": job, "payload": payload, "reporter": reporter})
        except Exception as e:
            raise _failed(cfg, e, reporter.root) from e
        return dict(reporter.history[-1]) if reporter.history else {}
    from rayapp.runtime import check_resources, ensure_ray

    ray = ensure_ray()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    r = cfg.resources
    check_resources(
        cpus=r.num_workers * r.cpus_per_worker,
        gpus=r.num_workers * r.gpus_per_worker if r.use_gpu else 0,
        what=f"job '{cfg.name}' (resources.num_workers={r.num_workers})",
    )
    per_worker = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    storage = str(Path(cfg.output_dir).resolve()) if "://" not in cfg.output_dir else cfg.output_dir
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"job": job, "payload": {k: ray.put(v) for k, v in payload.items()}},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(
            name=CHECKPOINT_RUN_NAME,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=r.max_failures),
            # Ray Train logs every report at INFO; our own progress line says what matters.
            logging_config=LoggingConfig(log_level=os.environ.get("RAYAPP_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # Ray Train v2 raises the workers' error instead of returning it
        raise _failed(cfg, e, Path(storage) / CHECKPOINT_RUN_NAME) from e
    if result.error is not None:
        raise _failed(cfg, result.error, Path(storage) / CHECKPOINT_RUN_NAME) from result.error
    return dict(result.metrics or {})


def _failed(cfg, error: BaseException, checkpoints: Path) -> TrainingFailed:
    return TrainingFailed(
        f"job '{cfg.name}' failed in the training workers: {type(error).__name__}: {error}\n"
        f"  checkpoints so far are in {checkpoints}; re-running the job resumes from the latest"
    )
