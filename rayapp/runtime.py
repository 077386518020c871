"""Connect to the Ray cluster a job runs on: ``RAY_ADDRESS`` if set, else an in-process local one.

A local cluster on a small machine is started with more *logical* CPUs than cores
(``RAYAPP_LOCAL_CPUS``, default 8): two Train workers plus a vLLM engine actor ask
for three CPUs, and on a 2-core machine Ray would otherwise wait forever for them.
Before launching anything, :func:`check_resources` compares what a job asks for with
what the cluster has and fails fast with a message that says what to change.
"""

from __future__ import annotations

import logging
import os

from rayapp.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LOCAL_CPUS = 8


class ResourceError(UserError, RuntimeError):
    pass


def ensure_ray(namespace: str = "rayapp"):
    """Return the ``ray`` module, initialised once per process."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    # Library code in workers must find rayapp even when the driver runs from a checkout.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = int(os.environ.get("RAYAPP_LOCAL_CPUS", max(DEFAULT_LOCAL_CPUS, os.cpu_count() or 1)))
        runtime_env = {**runtime_env, "worker_process_setup_hook": "rayapp.runtime.quiet_local_worker"}
        ray.init(
            # "local": always a fresh in-process cluster; plain None would attach to any cluster
            # that `ray start` left running on this machine.
            address="local",
            num_cpus=num_cpus,
            namespace=namespace,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    return ray


def quiet_local_worker() -> None:
    """Runs in every worker process of the embedded cluster. It has no dashboard, so no State API:
    Ray Train's placement-group cleaner (which asks that API whether the controller is alive,
    every second) would log "Failed to query Ray Train Controller actor state" for the whole job.
    The cleaner only matters when a controller dies and the cluster lives on; the embedded
    cluster ends with the job."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def check_resources(cpus: float = 0.0, gpus: float = 0.0, what: str = "this job") -> None:
    """Raise ResourceError when the cluster can never satisfy the request (instead of waiting forever)."""
    ray = ensure_ray()
    total = ray.cluster_resources()
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    problems = []
    if cpus > have_cpu:
        problems.append(f"{cpus:g} CPUs but the cluster has {have_cpu:g}")
    if gpus > have_gpu:
        problems.append(f"{gpus:g} GPUs but the cluster has {have_gpu:g}")
    if problems:
        hint = (
            "set resources.use_gpu: false (and engine.use_gpu: false) to run on CPU, "
            "lower resources.num_workers / engine.num_engines, "
            "or start the local cluster with more logical CPUs (RAYAPP_LOCAL_CPUS)"
        )
        raise ResourceError(f"{what} asks for {' and '.join(problems)}; {hint}")
