"""All of Ray Train, for every training recipe: scaling, placement, storage, failures, checkpoints, the payload.

``launch(worker_fn, cfg, **payload)`` runs ``worker_fn(config)`` on ``resources.num_workers`` Ray
Train workers. The process group is gloo on CPU and ``cpu:gloo,cuda:nccl`` on GPUs
(:func:`rayapp.training.parallel.process_group_backend`: the loop all-reduces CPU tensors too).
Workers are placed with ``resources.placement_strategy`` (PACK: as few nodes as possible; SPREAD:
one per node where it can). Checkpoints go under ``output_dir/checkpoints`` through the job's
:class:`~rayapp.storage.OutputStore` (a local path, a shared mount, or s3:// / gs://), kept by Ray
Train; a re-run of the same job finds them and resumes, and ``resources.max_failures`` restarts a
lost worker group (a dead process or a lost node) from the latest one. Each payload value goes
into the object store once (``ray.put``).

Inside the worker, ``worker_context(config)`` gives back the job config, the payload, the output
store, this worker's rank / world / device, the Reporter the step loop talks to, and
``prepare(model)``: DDP or FSDP2 with the resolved precision and activation checkpointing
(:func:`rayapp.training.parallel.prepare_model`). Rank 0 records where every rank runs in
``output_dir/workers.json`` (one entry per start of the worker group). With ``in_process=True``
the same worker function runs in this process instead, with a :class:`LocalReporter` keeping
checkpoints under the output store's local directory (benches, notebooks, tests): no Ray at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from rayapp.errors import UserError
from rayapp.training.loop import LocalReporter, LoopResult, Reporter, fit

CHECKPOINT_RUN_NAME = "checkpoints"


class TrainingFailed(UserError):
    pass


class RayReporter:
    """The loop's Reporter inside a Ray Train worker. Every rank reports the checkpoint directory
    it wrote (its shard); Ray Train copies them all into one checkpoint under output_dir."""

    keeps_checkpoints = True

    def __init__(self):
        self._latest: str | None = None
        self._chosen = False
        self._downloaded: list[str] = []  # local copies of checkpoints at a URI, removed after the next report
        self._unreadable: set[str] = set()  # names of damaged checkpoint directories, never reused

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=self._dir_name(metrics["step"]),
            )
        else:
            ray.train.report(metrics)
        # Loaded by now on every rank: report is a barrier. Ranks on one node share the copy.
        for d in self._downloaded:
            shutil.rmtree(d, ignore_errors=True)
        self._downloaded = []

    def _dir_name(self, step: int) -> str:
        """``step_NNNNNN``; ``step_NNNNNN_K`` when a damaged checkpoint still holds that name (Ray
        Train's snapshot lists it, and pruning it later would delete the new one's files)."""
        name, k = f"step_{step:06d}", 1
        while name in self._unreadable:
            name, k = f"step_{step:06d}_{k}", k + 1
        return name

    def checkpoint_candidates(self):
        """(name, local directory) of the latest registered checkpoint, then of the older step_*
        directories beside it that have a meta.json, newest first (Ray Train keeps
        ``train.keep_checkpoints`` of them). A local filesystem (a path or a shared mount) is read in
        place; a checkpoint at a URI is downloaded when its turn comes."""
        import pyarrow.fs
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        fs, path = ckpt.filesystem, ckpt.path.rstrip("/")
        local = isinstance(fs, pyarrow.fs.LocalFileSystem)

        def fetch(p: str) -> str:
            if local:
                return p
            d = ray.train.Checkpoint(p, filesystem=fs).to_directory()
            self._downloaded.append(d)
            return d

        yield (path if local else f"{ckpt.filesystem.type_name}://{path}"), fetch(path)
        parent, newest = path.rsplit("/", 1)
        older = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(parent)):
            if info.type == pyarrow.fs.FileType.Directory and _step_key(info.base_name) < _step_key(newest):
                if fs.get_file_info(f"{info.path}/meta.json").type != pyarrow.fs.FileType.NotFound:
                    older.append(info.path)
        for p in sorted(older, key=lambda p: _step_key(p.rsplit("/", 1)[1]), reverse=True):
            yield (p if local else f"{fs.type_name}://{p}"), fetch(p)

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint as a local directory (see :meth:`checkpoint_candidates`);
        damaged newer ones are passed with a warning from rank 0. Every rank checks the same files,
        so every rank picks the same one. Chosen once per run of the worker group."""
        import ray.train

        from rayapp.training.checkpoint import select_checkpoint

        if self._chosen:
            return self._latest
        rank = ray.train.get_context().get_world_rank()
        chosen = select_checkpoint(self.checkpoint_candidates(),
                                   warn=(lambda m: print(f"WARNING: {m}", file=sys.stderr, flush=True)) if rank == 0 else None)
        self._latest, self._chosen = (chosen.path if chosen else None), True
        self._unreadable = {name.rstrip("/").rsplit("/", 1)[-1] for name, _ in (chosen.passed if chosen else [])}
        return self._latest


def _step_key(name: str) -> tuple[int, int]:
    """Orders ``step_NNNNNN`` and ``step_NNNNNN_K`` directory names; anything else sorts first."""
    m = re.fullmatch(r"step_(\d+)(?:_(\d+))?", name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


@dataclass
class WorkerContext:
    """What a worker function works with: ``cfg`` and ``payload`` as the driver gave them."""

    cfg: Any
    payload: dict[str, Any]
    store: Any  # rayapp.storage.OutputStore: output_dir; rank 0 writes in store.local
    rank: int
    world: int
    device: Any  # torch.device
    reporter: Reporter
    in_process: bool = False

    @property
    def strategy(self) -> str:
        """'ddp' or 'fsdp' from resources.strategy; 'none' in a single process."""
        return "none" if self.world == 1 and self.in_process else self.cfg.resources.strategy

    def prepare(self, model):
        """Place ``model`` on this worker's device and wrap it as ``resources.strategy`` says (DDP,
        or FSDP2 sharding on every decoder layer), with ``train.precision`` (resolved for the
        device) and ``train.activation_checkpointing``. Every rank calls it before the optimizer
        is built."""
        from rayapp.training.parallel import prepare_model

        t = self.cfg.train
        return prepare_model(model, self.strategy, self.device, t.resolved_precision(self.device.type == "cuda"),
                             activation_checkpointing=t.activation_checkpointing)

    def fit(self, model, **loop_args) -> LoopResult:
        """The shared step loop (:func:`rayapp.training.loop.fit`) with this job's settings: the train
        section, the reporter, metrics.jsonl in the output store (rank 0 brings a killed run's rows
        back first, and uploads them before every checkpoint), the job name and the device."""
        t = self.cfg.train
        if t.packing:
            from rayapp.data.packing import check_packing_honoured

            check_packing_honoured(model, self.device)
        if self.rank == 0:
            self.store.pull("metrics.jsonl")
        return fit(model=model, cfg=t, micro_batch_size=t.micro_batch_size, reporter=self.reporter,
                   metrics_path=self.store.path("metrics.jsonl"), name=self.cfg.name, device=self.device,
                   publish_metrics=lambda: self.store.push("metrics.jsonl"), **loop_args)


def worker_context(config: dict) -> WorkerContext:
    """Called first by every worker function: the job config and payload, torch threads, device."""
    import torch

    from rayapp.config.loader import load_job_dict

    cfg = load_job_dict(config["job"])
    store = config["store"]
    if "reporter" in config:  # in process: launch(..., in_process=True) made the reporter
        device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
        w = WorkerContext(cfg, dict(config["payload"]), store, 0, 1, device, config["reporter"], in_process=True)
        record_workers(w, None)
        return w
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
    w = WorkerContext(cfg, payload, store, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                      RayReporter())
    record_workers(w, ray.get_runtime_context().get_node_id())
    return w


def record_workers(w: WorkerContext, node_id: str | None) -> list[dict]:
    """Where every rank runs (rank, Ray node id, host name, device, pid), gathered on rank 0 and
    appended to output_dir/workers.json as one entry per start of the worker group (a restart
    after a lost node adds one). Every rank calls it. Returns the gathered list."""
    import torch.distributed as dist

    me = {"rank": w.rank, "node_id": node_id, "hostname": socket.gethostname(), "device": str(w.device),
          "pid": os.getpid()}
    everyone: list = [me]
    if w.world > 1 and dist.is_available() and dist.is_initialized():
        everyone = [None] * w.world
        dist.all_gather_object(everyone, me)
    if w.rank == 0:
        w.store.pull("workers.json")
        path = w.store.path("workers.json")
        starts = json.loads(path.read_text())["starts"] if path.exists() else []
        starts.append({"time": time.time(), "world_size": w.world, "strategy": w.strategy, "workers": everyone})
        w.store.write_json("workers.json", {"starts": starts})
    return everyone


def build_model(model_dir: str, cfg, dropout: bool = True):
    """The model a worker trains: the base from ``model_dir``, then LoRA when ``adapter`` is set.
    ``dropout=False`` turns every dropout off (``rayapp.models.io.disable_dropout``): RL and DPO,
    whose losses compare two passes of the same weights."""
    from rayapp.models.io import disable_dropout, load_causal_lm
    from rayapp.models.lora import apply_lora

    model = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    if cfg.adapter is not None:
        model = apply_lora(model, cfg.adapter)
    return model if dropout else disable_dropout(model)


def launch(worker_fn, cfg, *, in_process: bool = False, store=None, **payload) -> dict:
    """Run ``worker_fn`` for the training job ``cfg`` and return the metrics it reported last.

    ``payload``: the values the workers need (data, model references, actor handles), each put
    into Ray's object store once; the worker reads them from ``worker_context(config).payload``.
    ``store``: the job's output store (``prepare_output(cfg)``; opened here when not given). It
    travels to the workers pickled, with the S3 endpoint inside, and gives Ray Train its
    storage path and filesystem.
    ``in_process``: run the worker function here, with no Ray (see the module docstring).
    Raises :class:`TrainingFailed` naming the job and where its checkpoints are."""
    from rayapp.storage import open_output

    job = cfg.model_dump(mode="json", by_alias=True)
    store = store if store is not None else open_output(cfg.output_dir)
    if in_process:
        reporter = LocalReporter(store.path(CHECKPOINT_RUN_NAME))
        try:
            worker_fn({"job": job, "payload": payload, "store": store, "reporter": reporter})
        except Exception as e:
            raise _failed(cfg, e, str(reporter.root), store) from e
        return dict(reporter.history[-1]) if reporter.history else {}
    from rayapp.runtime import check_resources, ensure_ray

    ray = ensure_ray()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    from rayapp.training.parallel import process_group_backend

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    check_resources(
        cpus=r.num_workers * r.cpus_per_worker,
        gpus=r.num_workers * r.gpus_per_worker if r.use_gpu else 0,
        what=f"job '{cfg.name}' (resources.num_workers={r.num_workers})",
        bundles=[per_worker] * r.num_workers,
        fields={"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"},
        strategy=r.placement_strategy,
    )
    checkpoints = store.uri_of(CHECKPOINT_RUN_NAME)
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"job": job, "store": store, "payload": {k: ray.put(v) for k, v in payload.items()}},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker,
                                     placement_strategy=r.placement_strategy),
        torch_config=TorchConfig(backend=process_group_backend("cuda" if r.use_gpu else "cpu")),
        run_config=RunConfig(
            name=CHECKPOINT_RUN_NAME,
            **store.run_config_kwargs(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=r.max_failures),
            # Ray Train logs every report at INFO; our own progress line says what matters.
            logging_config=LoggingConfig(log_level=os.environ.get("RAYAPP_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # Ray Train v2 raises the workers' error instead of returning it
        remove_unregistered_checkpoints(store)
        raise _failed(cfg, e, checkpoints, store) from e
    if result.error is not None:
        remove_unregistered_checkpoints(store)
        raise _failed(cfg, result.error, checkpoints, store) from result.error
    return dict(result.metrics or {})


def remove_unregistered_checkpoints(store) -> list[str]:
    """After a failed run (its workers gone): remove the step_* directories under
    output_dir/checkpoints that Ray Train's snapshot does not list. Those are uploads that did not
    finish (a full disk, a lost worker): some rank's files may be cut short or missing while
    another rank's meta.json is there. Nothing is removed when the snapshot cannot be read.
    Returns the directories removed."""
    import pyarrow.fs

    base = f"{store.root.rstrip('/')}/{CHECKPOINT_RUN_NAME}"
    try:
        with store.fs.open_input_stream(f"{base}/checkpoint_manager_snapshot.json") as f:
            snapshot = json.loads(f.read().decode())
        registered = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except FileNotFoundError:
        registered = set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    removed = []
    try:
        for info in store.fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
            if info.type == pyarrow.fs.FileType.Directory and _step_key(info.base_name) >= (0, 0) \
                    and info.base_name not in registered:
                store.fs.delete_dir(info.path)
                removed.append(info.path)
    except OSError:
        pass
    return removed


def _no_space(error: BaseException) -> bool:
    e: BaseException | None = error
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _failed(cfg, error: BaseException, checkpoints: str, store=None) -> TrainingFailed:
    if _no_space(error):
        where = store.uri if store is not None else cfg.output_dir
        free = ""
        if store is not None and not store.remote:
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(store.root)
                free = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB)"
        line = next((ln.strip() for ln in str(error).splitlines() if "No space left on device" in ln), str(error))
        return TrainingFailed(
            f"job '{cfg.name}' failed: no space left on device under output_dir {where}{free}: {line}\n"
            f"  free space there, or set output_dir to a filesystem with room for train.keep_checkpoints="
            f"{cfg.train.keep_checkpoints} checkpoints and the model; then re-run the job: it resumes from the "
            f"latest complete checkpoint in {checkpoints} (unfinished ones were removed)"
        )
    return TrainingFailed(
        f"job '{cfg.name}' failed in the training workers: {type(error).__name__}: {error}\n"
        f"  checkpoints so far are in {checkpoints}; re-running the job resumes from the latest"
    )
