"""Connect to the Ray cluster a job runs on: ``RAY_ADDRESS`` if set, else an in-process local one.

A local cluster on a small machine is started with more *logical* CPUs than cores
(``RAYAPP_LOCAL_CPUS``, default 8): two Train workers plus a vLLM engine actor ask
for three CPUs, and on a 2-core machine Ray would otherwise wait forever for them.
Before launching anything, :func:`check_resources` compares what a job asks for with
what the cluster has and fails fast with a message that says what to change.

The in-process cluster keeps Ray's token authentication and binds only 127.0.0.1
(:func:`loopback_only`); see SECURITY.md.
"""

from __future__ import annotations

import logging
import os
import sys

from rayapp.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LOCAL_CPUS = 8
# Ray's single-machine mode: the node address, and every server bound to it, stays on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class ResourceError(UserError, RuntimeError):
    pass


def loopback_only() -> None:
    """Keep this process's Ray on 127.0.0.1: the cluster it starts listens there, and a client of
    ``127.0.0.1:PORT`` connects there.

    Ray takes a node's address from the machine's network address: it opens its GCS, raylet and
    worker ports on it (``*:PORT``) and rewrites a client's ``127.0.0.1`` to it. In its
    single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the macOS default) the node
    address is 127.0.0.1 and so is every server. Ray reads that variable into a module constant on
    import, so it is set before ``import ray`` — and on the constant when something imported Ray
    first. Child processes (raylet, workers, ``ray start``) inherit the variable.
    """
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def require_token_auth() -> None:
    """Clients of this process present the machine's Ray token (``RAY_AUTH_MODE=token``).

    Ray caches its config when it is first imported; when that has already happened the cache is
    re-read, as ``ray.init`` itself does when it turns token auth on for a new local cluster.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def ensure_ray(namespace: str = "rayapp"):
    """Return the ``ray`` module, initialised once per process."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or _is_loopback(address):
        loopback_only()
    if not address and os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        # A shell's RAY_AUTH_MODE=disabled (meant for some other cluster) never opens one rayapp starts;
        # unset, ray.init turns token authentication on for a new local cluster.
        log.warning("RAY_AUTH_MODE=%s ignored: the local Ray cluster rayapp starts keeps token authentication",
                    os.environ.pop("RAY_AUTH_MODE"))
    import ray

    if ray.is_initialized():
        return ray
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
