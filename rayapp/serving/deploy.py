"""`kind: deploy` and the deploy helpers training recipes call when `deploy.enabled` is true.

Reads top to bottom: find what to serve (a model directory, or a job's output_dir with
model/ or adapter/), check it, connect to the cluster (``RAY_ADDRESS``, else the persistent
local head of :mod:`rayapp.serving.local_head`), ``serve.run`` the app of
:mod:`rayapp.serving.app`, and report the URL and model name. A reward model (a reward_model
job's output) is served on ``/v1/score`` instead (:func:`deploy_reward_model`; the API is in
:mod:`rayapp.serving.reward_server`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rayapp.config.base import DeployConfig
from rayapp.serving.errors import DeployError

log = logging.getLogger(__name__)


@dataclass
class DeployInfo:
    url: str                      # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    model_name: str               # what clients send as `model`
    adapters: list[str] = field(default_factory=list)
    app_name: str = ""
    ray_address: str = ""
    api_key_required: bool = False
    kind: str = "generate"        # "generate" (OpenAI API) or "reward" (/v1/score)

    def summary(self) -> dict:
        return {f"deploy_{k}": v for k, v in asdict(self).items()}


@dataclass
class Source:
    """What a deployment serves: local directories on this machine (checked, read for limits), and
    for what came from an ``s3://`` / ``gs://`` URI, the URI, which each replica downloads into its
    own node's cache (on this machine that is the same cached copy)."""

    base: Path
    adapters: dict[str, str]
    base_uri: str | None = None
    adapter_uris: dict[str, str] = field(default_factory=dict)

    def stores(self) -> dict:
        """``{"model": OutputStore or None, "adapters": {name: OutputStore}}`` for the URIs: a store
        pickles with its endpoint inside, so a replica reaches the same server as this process."""
        from rayapp.storage import open_output

        return {"model": open_output(self.base_uri, check=False) if self.base_uri else None,
                "adapters": {k: open_output(u, check=False) for k, u in self.adapter_uris.items()}}


def resolve_source(model: str, adapters: dict[str, str] | None = None, name: str = "model") -> tuple[Path, dict[str, str]]:
    """(base model dir, adapters) from a model reference or a job's output_dir, as local
    directories (a URI is downloaded into the local cache first: :func:`find_source`)."""
    src = find_source(model, adapters, name)
    return src.base, src.adapters


def find_source(model: str, adapters: dict[str, str] | None = None, name: str = "model") -> Source:
    """The :class:`Source` for a model reference (a directory, a built-in name, a Hub id, a URI of
    a model directory) or a job's output_dir (local or a URI: its published model/, else adapter/
    on the base model its config.resolved.yaml names), plus LoRA ``adapters`` (name -> directory
    or URI)."""
    from rayapp.models.io import resolve_model
    from rayapp.storage import is_uri

    adapters = dict(adapters or {})
    adapter_uris = {k: v for k, v in adapters.items() if is_uri(v)}
    base_uri = None
    if is_uri(model):
        base, base_uri, job_adapter = _uri_source(model)
        if job_adapter:
            adapter_uris.setdefault(name, job_adapter)
            adapters.setdefault(name, job_adapter)
    else:
        path = Path(model).expanduser()
        if (path / "model" / "config.json").exists():        # a job's output_dir with a (merged) model
            base = path / "model"
        elif (path / "adapter" / "adapter_config.json").exists():  # adapter-only output: serve it on its base
            base = _base_of_job(path)
            adapters.setdefault(name, str(path / "adapter"))
        else:
            base = resolve_model(model)
    for adapter_name, adapter_dir in adapters.items():
        if adapter_name in adapter_uris:
            adapter_dir = adapters[adapter_name] = str(_fetch(adapter_uris[adapter_name], f"adapter '{adapter_name}'"))
        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise DeployError(
                f"adapter '{adapter_name}': {adapter_uris.get(adapter_name, adapter_dir)} has no adapter_config.json; "
                "give a PEFT LoRA directory (a job's output_dir/adapter)"
            )
        if ":" in adapter_name or "/" in adapter_name:
            raise DeployError(f"adapter name '{adapter_name}': use letters, digits, '-' or '_' (no ':' or '/')")
    return Source(Path(base), adapters, base_uri, adapter_uris)


def _fetch(uri: str, what: str) -> Path:
    from rayapp.storage import StorageError, fetch_dir

    try:
        return fetch_dir(uri)
    except StorageError as e:
        raise DeployError(f"{what}: {e}") from e


def _uri_source(uri: str) -> tuple[Path, str | None, str | None]:
    """(local base dir, its URI or None, adapter URI or None) for a URI: a job's output_dir with a
    published model/ or adapter/, else a model directory itself."""
    import yaml

    from rayapp.models.io import resolve_model
    from rayapp.storage import StorageError, open_output

    try:
        store = open_output(uri)
        if store.is_complete("model"):
            model_uri = store.uri_of("model")
            return _fetch(model_uri, "model"), model_uri, None
        if store.is_complete("adapter"):
            resolved = yaml.safe_load(store.read_text("config.resolved.yaml")) if store.exists("config.resolved.yaml") else {}
            base_ref = ((resolved or {}).get("model") or {}).get("path")
            if not base_ref:
                raise DeployError(f"{uri}/adapter has no base model: {uri}/config.resolved.yaml is missing or names no "
                                  f"model.path; deploy the base with `--adapter NAME={uri}/adapter`")
            return resolve_model(str(base_ref)), None, store.uri_of("adapter")
        if store.exists("config.json"):  # a model directory uploaded as is
            return _fetch(uri, "model"), uri, None
    except StorageError as e:
        raise DeployError(f"model {uri}: {e}") from e
    for part in ("model", "adapter"):
        if store.exists(part):
            raise DeployError(f"{uri}/{part} is not complete (an upload is under way or was interrupted); wait for "
                              "the job to finish, or run it again to publish it")
    raise DeployError(f"{uri}: no model/ or adapter/ of a job and no config.json there; give a job's output_dir "
                      "or a model directory")


def _base_of_job(output_dir: Path) -> Path:
    import yaml

    from rayapp.models.io import resolve_model

    resolved = output_dir / "config.resolved.yaml"
    if not resolved.exists():
        raise DeployError(f"{output_dir}/adapter has no base model: {resolved} is missing; deploy the base "
                          f"directory with `--adapter NAME={output_dir}/adapter`")
    base_ref = ((yaml.safe_load(resolved.read_text()) or {}).get("model") or {}).get("path")
    if not base_ref:
        raise DeployError(f"{resolved}: model.path is missing; cannot tell which base model the adapter belongs to")
    return resolve_model(str(base_ref))


def connect(start_local: bool = True):
    """Connect to RAY_ADDRESS, or to the persistent local head (started if ``start_local``)."""
    import ray

    from rayapp.runtime import ensure_ray
    from rayapp.serving.local_head import ensure_local_head, running_head, use_head

    if ray.is_initialized():
        return ray
    if not os.environ.get("RAY_ADDRESS"):
        if start_local:
            ensure_local_head()
        else:
            address = running_head()
            if address is None:
                return None
            use_head(address)
    return ensure_ray()


def start_serve(deploy: DeployConfig) -> int:
    """Start Serve's HTTP proxy on deploy.host:port, or reuse the running one; return its port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        try:
            serve.start(http_options={"host": deploy.host, "port": deploy.port})
        except TimeoutError:  # "HTTP proxies not available after 60s": a busy machine, or a real failure
            _wait_for_proxies()
        return deploy.port
    port = client.http_config.port
    if port != deploy.port:
        log.warning("Ray Serve already listens on port %d on this cluster; deploy.port=%d is ignored", port, deploy.port)
    return port


def _wait_for_proxies() -> None:
    """After serve.start()'s fixed 60 s: wait (up to runtime.SERVE_PROXY_START_WAIT_S) for every HTTP
    proxy the controller is starting to be healthy; a proxy that is still not, or that died, is an error."""
    import time

    from ray import serve

    from rayapp.runtime import SERVE_PROXY_START_WAIT_S

    deadline = time.monotonic() + SERVE_PROXY_START_WAIT_S
    states: dict = {}
    while time.monotonic() < deadline:
        states = {node: str(getattr(state, "value", state)) for node, state in serve.status().proxies.items()}
        if states and all(state == "HEALTHY" for state in states.values()):
            log.info("Serve's HTTP proxy became ready after more than 60 s (a busy machine)")
            return
        time.sleep(2)
    raise DeployError(f"Ray Serve's HTTP proxy is not ready after {SERVE_PROXY_START_WAIT_S + 60} s (proxy states: "
                      f"{states or 'none'}); is the port free and the machine not overloaded? See the Ray logs "
                      "(logs/console.log, or the head's session_latest/logs/serve/)")


def deploy_model(model_dir: str | Path, adapters: dict[str, str] | None, deploy: DeployConfig, name: str) -> DeployInfo:
    """Serve ``model_dir`` (+ LoRA ``adapters``: name -> dir) as ``name``; return where it answers."""
    from ray import serve

    from rayapp.serving.app import build_app, read_api_key

    src = find_source(str(model_dir), adapters, name)
    base, adapters = src.base, src.adapters
    api_key = read_api_key(deploy)
    ray = connect()
    _check_capacity(ray, deploy)
    port = start_serve(deploy)
    started = time.time()
    log.info("deploying %s from %s (adapters: %s) ...", name, src.base_uri or base, ", ".join(adapters) or "none")
    app = build_app(base, name, deploy, adapters, api_key=api_key, sources=src.stores())
    try:
        serve.run(app, name=name, route_prefix=deploy.route_prefix, blocking=False)
    except RuntimeError as e:  # the replica's own error is in the message; the full log is on the cluster
        raise DeployError(
            f"deploying '{name}' from {base} failed: {str(e)[-1500:]}\n"
            "check that the directory loads with vLLM (config.json, safetensors, tokenizer), that "
            "deploy.max_model_len fits the model, and see the replica log above"
        ) from e
    prefix = deploy.route_prefix.rstrip("/")
    info = DeployInfo(
        url=f"http://{deploy.host}:{port}{prefix}/v1", model_name=name, adapters=sorted(adapters), app_name=name,
        ray_address=os.environ.get("RAY_ADDRESS", "in-process"), api_key_required=api_key is not None,
    )
    log.info("serving %s at %s (ready in %.0f s)", name, info.url, time.time() - started)
    if deploy.blocking:
        _serve_until_interrupted(name)
    return info


def _check_capacity(ray, deploy: DeployConfig) -> None:
    from rayapp.runtime import check_resources

    replicas = max(1, deploy.min_replicas)
    if deploy.use_gpu:
        check_resources(gpus=replicas * deploy.tensor_parallel_size, what=f"deploy ({replicas} replica(s))")
    else:
        check_resources(cpus=replicas * 2, what=f"deploy ({replicas} replica(s) of 2 CPUs each)")


def _serve_until_interrupted(name: str) -> None:
    from ray import serve

    print(f"serving {name}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(name)


def deploy_reward_model(model_dir: str | Path, deploy: DeployConfig, name: str) -> DeployInfo:
    """Serve the ``*ForSequenceClassification`` model in ``model_dir`` (or a reward_model job's
    output_dir) as ``name`` on ``/v1/score``; return where it answers."""
    from ray import serve

    from rayapp.models.io import resolve_model
    from rayapp.serving.app import RequestLimits, key_digest, read_api_key
    from rayapp.serving.reward_server import build_reward_deployment
    from rayapp.storage import is_uri

    if is_uri(model_dir):  # each replica downloads it into its node's cache (RewardScorer)
        src = find_source(str(model_dir))
        base = src.stores()["model"] or src.base
    else:
        path = Path(model_dir)
        base = path / "model" if (path / "model" / "config.json").exists() else resolve_model(str(model_dir))
    api_key = read_api_key(deploy)
    connect()
    port = start_serve(deploy)
    # The key's digest, never the key, travels with the app.
    RewardModelDeployment = build_reward_deployment(key_digest(api_key) if api_key else None,
                                                    RequestLimits.from_deploy(deploy))
    started = time.time()
    deployment = RewardModelDeployment.options(
        autoscaling_config={"min_replicas": deploy.min_replicas, "initial_replicas": max(1, deploy.min_replicas),
                            "max_replicas": deploy.max_replicas,
                            "target_ongoing_requests": deploy.target_ongoing_requests},
    )
    try:
        serve.run(deployment.bind(base if hasattr(base, "fetch_dir") else str(base), name, deploy.max_model_len or 512), name=name,
                  route_prefix=deploy.route_prefix, blocking=False)
    except RuntimeError as e:
        raise DeployError(f"deploying reward model '{name}' from {base} failed: {str(e)[-1500:]}\n"
                          "is it a *ForSequenceClassification directory (a reward_model job's output)?") from e
    prefix = deploy.route_prefix.rstrip("/")
    info = DeployInfo(url=f"http://{deploy.host}:{port}{prefix}/v1", model_name=name, app_name=name,
                      ray_address=os.environ.get("RAY_ADDRESS", "in-process"),
                      api_key_required=api_key is not None, kind="reward")
    log.info("serving reward model %s at %s/score (ready in %.0f s)", name, info.url, time.time() - started)
    return info


def deploy_job_output(output_dir: str | Path, deploy: DeployConfig, name: str) -> DeployInfo:
    """Serve what a training job left in ``output_dir`` (model/, else adapter/ on its base model)."""
    return deploy_model(output_dir, {}, deploy, name)


def status() -> list[dict]:
    """Every Serve application on the cluster: name, state, URL, model names, replicas per deployment."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if connect(start_local=False) is None:
        return []
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return []
    http = client.http_config
    details = client.get_serve_details().get("applications", {})
    rows = []
    for app_name, app in serve.status().applications.items():
        replicas = {d: dict(s.replica_states) for d, s in app.deployments.items()}
        prefix = ((details.get(app_name) or {}).get("route_prefix") or "/").rstrip("/")
        rows.append({
            "name": app_name, "state": str(app.status.value if hasattr(app.status, "value") else app.status),
            "url": f"http://{http.host}:{http.port}{prefix}/v1", "replicas": replicas,
            "message": app.message,
        })
    return rows


def shutdown(name: str | None = None) -> list[str]:
    """Delete one application (or all); stop the local head rayapp started when nothing is left."""
    from ray import serve

    from rayapp.serving.local_head import stop_local_head

    ray = connect(start_local=False)
    removed: list[str] = []
    if ray is not None:
        apps = list(serve.status().applications)
        if name is not None and name not in apps:
            raise DeployError(f"no deployment named '{name}'; deployed: {', '.join(apps) or 'none'}")
        for app_name in [name] if name else apps:
            serve.delete(app_name)
            removed.append(app_name)
        left = list(serve.status().applications)
        if not left:
            serve.shutdown()
        ray.shutdown()
        if not left and stop_local_head():
            removed.append("(local Ray head)")
    else:
        stop_local_head()  # clears a record left by a head that is already gone
    return removed


def run(cfg) -> dict:
    """`kind: deploy`: serve cfg.model (a directory, built-in name or job output) with cfg.adapters."""
    name = cfg.deploy.name or cfg.name
    if cfg.reward:
        info = deploy_reward_model(cfg.model, cfg.deploy, name)
    else:
        info = deploy_model(cfg.model, cfg.adapters, cfg.deploy, name)
    print(f"serving model '{info.model_name}' at {info.url}", flush=True)
    return info.summary()


def validate(cfg) -> str:
    from rayapp.serving.app import read_api_key

    name = cfg.deploy.name or cfg.name
    base, adapters = resolve_source(cfg.model, cfg.adapters, name)
    key = read_api_key(cfg.deploy)
    lines = [f"model: {base}", f"served as: {name}" + (" (reward model, /v1/score)" if cfg.reward else "")]
    lines += [f"adapter {k}: {v}" for k, v in adapters.items()]
    lines.append(f"endpoint: http://{cfg.deploy.host}:{cfg.deploy.port}{cfg.deploy.route_prefix.rstrip('/')}/v1, "
                 f"replicas {cfg.deploy.min_replicas}..{cfg.deploy.max_replicas}, "
                 f"API key {'required' if key else 'not required'}")
    return "\n".join(lines)
