"""Ray Train glue shared by the training recipes: scaling, storage, failures, checkpoints.

``launch(worker_fn, worker_config, cfg)`` runs ``worker_fn(worker_config)`` on
``resources.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPUs) with checkpoints
under ``output_dir/checkpoints`` (kept by Ray Train; a re-run of the same job finds them and
resumes, and ``resources.max_failures`` restarts a lost worker group from the latest one).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rayapp.runtime import check_resources, ensure_ray

CHECKPOINT_RUN_NAME = "checkpoints"


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


def worker_setup(num_threads_hint: float = 1.0) -> dict:
    """Per-worker set-up: torch threads, device. Returns rank / world / device."""
    import ray.train
    import torch

    # Ray Train logs every report at INFO on the console; our progress line says what matters.
    level = os.environ.get("RAYAPP_TRAIN_LOG_LEVEL", "WARNING")
    for name in ["ray.train", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.train.")]]:
        logging.getLogger(name).setLevel(level)
    ctx = ray.train.get_context()
    local = max(1, ctx.get_local_world_size())
    threads = max(1, int(num_threads_hint), (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    return {"rank": ctx.get_world_rank(), "world": ctx.get_world_size(), "device": device}


def launch(worker_fn, worker_config: dict, cfg):
    """Run ``worker_fn`` on Ray Train workers for a TrainingJobConfig ``cfg``; returns the Ray Train Result."""
    ensure_ray()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
        train_loop_config=worker_config,
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
    from ray.train.v2.api.exceptions import TrainingFailedError

    from rayapp.training.common import TrainingFailed

    try:
        return trainer.fit()
    except TrainingFailedError as e:  # Ray Train v2 raises the workers' error instead of returning it
        raise TrainingFailed(
            f"job '{cfg.name}' failed in the training workers: {e}\n"
            f"  checkpoints so far are in {Path(storage) / CHECKPOINT_RUN_NAME}; re-running the job resumes from the latest"
        ) from e
