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
from collections import Counter

from rayapp.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LOCAL_CPUS = 8
# Ray's single-machine mode: the node address, and every server bound to it, stays on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Ray's waits that rayapp lengthens, each with the reason. Ray tunes them for idle machines; on a
# 2-core laptop or a CI runner that also runs vLLM engines or another cluster they run out while
# nothing is wrong, and Ray then kills a healthy job. Set before Ray starts (the in-process cluster,
# the persistent local head) and in every driver (Ray Train hands its RAY_TRAIN_* variables to its
# controller); a value already in the environment wins.
BUSY_MACHINE_TIMEOUTS: dict[str, tuple[str, str]] = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": (
        "600", "Train workers import torch and transformers before they report ready; Ray's 60 s runs out when "
               "the cores are shared with engines or another job"),
    "RAY_health_check_failure_threshold": (
        "20", "the GCS declares a raylet dead after 5 missed checks 3 s apart (Ray's default); a CPU-starved "
              "raylet misses them, and every worker on it is killed"),
    "RAY_agent_register_timeout_ms": (
        "300000", "the dashboard agent of a new node can take minutes to register on a loaded machine"),
    "RAY_raylet_start_wait_time_s": ("300", "`ray start` waits for its raylet that long, for the same reason"),
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": (
        "60", "Serve's controller gives a new HTTP proxy 5 s to answer its ready check, then kills and restarts it; "
              "a CPU-starved proxy needs longer, and `rayapp deploy` then failed with the proxy actor killed"),
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": (
        "60", "a running proxy that misses 3 health checks of 10 s in a row is killed, its open requests with it"),
}

# Serve's own wait for its HTTP proxy in serve.start() is a fixed 60 s (no setting); past it rayapp
# keeps waiting for the proxy the controller is still starting, up to this long.
SERVE_PROXY_START_WAIT_S = 600


def busy_machine_timeouts(env: dict | None = None) -> dict:
    """Put :data:`BUSY_MACHINE_TIMEOUTS` into ``env`` (default: this process's environment) where
    it does not set them already; returns ``env``."""
    env = os.environ if env is None else env
    for key, (value, _why) in BUSY_MACHINE_TIMEOUTS.items():
        env.setdefault(key, value)
    return env


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
    busy_machine_timeouts()
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
    # Library code in workers must find rayapp even when the driver runs from a checkout. Workers
    # keep what a person needs on the console (rayapp's progress lines, errors, warnings) and drop
    # progress bars and per-report INFO lines (`rayapp -v` keeps them).
    verbose = logging.getLogger("rayapp").isEnabledFor(logging.DEBUG)
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    if not verbose:
        env_vars.update(QUIET_WORKER_ENV)
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "rayapp.runtime.quiet_worker"}
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Starting execution of Dataset ..." per batch job
    if address:
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True,
                 logging_level=logging.DEBUG if verbose else logging.WARNING)
    else:
        num_cpus = int(os.environ.get("RAYAPP_LOCAL_CPUS", max(DEFAULT_LOCAL_CPUS, os.cpu_count() or 1)))
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


# Environment of every Ray worker of a rayapp job (unless `rayapp -v`): no download or weight-loading
# progress bars from huggingface_hub / transformers, no transformers advisory warnings.
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_worker() -> None:
    """Runs in every worker process of a rayapp job (``worker_process_setup_hook``).

    Ray Train's placement-group cleaner asks the State API every second whether the controller is
    alive; the embedded cluster has no dashboard, so no State API, and the persistent local head's
    answers time out under load: either way it logged "Failed to query Ray Train Controller actor
    state" for the whole job. The cleaner only matters when a controller dies and the cluster lives
    on. Ray Train's workers log every report ("Reporting training result N: TrainingReport(...)")
    at INFO; rayapp prints its own progress line."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    import ray

    # Code in this worker that looks for "the" cluster (the placement-group cleaner's State API
    # client) finds this one, not the newest of several on the machine ("Found multiple active Ray
    # instances ... Connecting to latest cluster", every second).
    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # not connected yet: nothing to pin
        pass
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # QUIET_WORKER_ENV: not under `rayapp -v`
        # That module's logger is named by its file path (logging.getLogger(__file__)).
        context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(context).setLevel(logging.WARNING)




def node_capacities(ray, most_per_type: int = 64) -> list[dict[str, float]]:
    """Total resources of every node a job could run on: the alive nodes, and on a cluster with an
    autoscaler (``ray up cluster.yaml``) ``max_workers`` more nodes of each type (an upper bound:
    some of them may be running already, so a job is never refused that the autoscaler could
    place; at most ``most_per_type`` of a type without a limit). Reads the autoscaler's cluster
    config from the GCS (``ray._private.state``: Ray has no public API for it); without one, the
    alive nodes only."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in alive]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older GCS, or no autoscaler: the alive nodes are all there is
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        resources = {k: float(v) for k, v in dict(group.resources).items()}
        if not resources:
            continue
        more = most_per_type if group.max_count < 0 else group.max_count
        nodes += [dict(resources) for _ in range(min(more, most_per_type))]
    return nodes


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` one node holds."""
    counts = [int(node.get(k, 0.0) // v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1 << 30


def _fmt_res(res: dict[str, float]) -> str:
    """CPU and GPU of a node or a bundle, e.g. ``{CPU: 2, GPU: 8}`` (other resources left out)."""
    shown = {"CPU": res.get("CPU", 0.0), **({"GPU": res["GPU"]} if res.get("GPU") else {})}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"


def check_resources(cpus: float = 0.0, gpus: float = 0.0, what: str = "this job", *, bundles: list[dict] | None = None,
                    fields: dict[str, str] | None = None, strategy: str = "PACK", count_field: str = "resources.num_workers") -> None:
    """Raise ResourceError when the cluster can never satisfy the request (instead of waiting forever).

    ``cpus`` / ``gpus``: the totals asked for, checked against what the cluster's nodes hold (and an
    autoscaler may add: :func:`node_capacities`). ``bundles``: the per-worker requests of one
    placement group (identical dicts, e.g. ``[{"CPU": 1, "GPU": 1}] * 8``): each must fit on one
    node, and the nodes together must hold all of them as ``strategy`` (a Ray placement strategy)
    places them; ``fields`` names the config field behind each resource for the message, and
    ``count_field`` the one behind the number of bundles."""
    ray = ensure_ray()
    nodes = node_capacities(ray)
    have_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    have_gpu = sum(n.get("GPU", 0.0) for n in nodes)
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
    if not bundles:
        return
    bundle, count = {k: float(v) for k, v in bundles[0].items() if v}, len(bundles)
    fields = fields or {}
    per_node = [_fits(n, bundle) for n in nodes]
    # largest nodes first, whatever order the GCS lists them in (a 0-CPU head last)
    by_size = sorted(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), reverse=True)
    shapes = ", ".join(f"{c} x {s}" for s, c in Counter(_fmt_res(n) for n in by_size).items())
    if not any(per_node):
        largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in bundle}
        short = [k for k, v in bundle.items() if v > largest[k]]
        change = "; ".join(f"set {fields.get(k, k)} to at most {largest[k]:g}" if largest[k] else
                           f"{fields.get(k, k)}: no node has any {k}" for k in short)
        if not short:  # each resource is on some node, but no node has all of them together
            short = list(bundle)
            change = "no node has " + " and ".join(f"{bundle[k]:g} {k} ({fields.get(k, k)})" for k in short) + " together"
        raise ResourceError(
            f"{what} asks for {count} worker(s) of {_fmt_res(bundle)} each, but no node of this cluster can hold one "
            f"(nodes: {shapes}): {change}, or add nodes with at least {' and '.join(f'{bundle[k]:g} {k}' for k in short)}"
        )
    if strategy == "STRICT_PACK":
        holds = max(per_node)
        how = "on one node (placement_strategy STRICT_PACK)"
    elif strategy == "STRICT_SPREAD":
        holds = sum(1 for k in per_node if k)
        how = "one per node (placement_strategy STRICT_SPREAD)"
    else:
        holds = sum(per_node)
        how = "on all nodes together"
    if holds < count:
        raise ResourceError(
            f"{what} asks for {count} worker(s) of {_fmt_res(bundle)} each, but the cluster holds at most {holds} "
            f"{how} (nodes: {shapes}); lower {count_field} to {holds}, ask for less per worker "
            f"({', '.join(fields.get(k, k) for k in bundle)}), or add nodes"
        )
