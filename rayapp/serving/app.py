"""The OpenAI-compatible Serve application: ``ray.serve.llm`` with rayapp's auth and local LoRA adapters.

``ray.serve.llm`` does the serving (``LLMServer`` deployments running vLLM, the
``OpenAiIngress`` routes, streaming, multiplexed LoRA). rayapp adds three things:

- an API-key check in front of every route (a FastAPI/ASGI middleware on the ingress app);
- LoRA adapters read from local directories (``ray.serve.llm`` only loads them from cloud
  buckets): :class:`RayappLLMServer` resolves ``base:NAME`` to the directory given at deploy time;
- friendly adapter names: a request's ``model: NAME`` is routed as ``base:NAME``, and
  ``/v1/models`` lists the base model and every adapter.

:func:`build_app` mirrors ``ray.serve.llm.build_openai_app`` (whose ingress app cannot take a
middleware) using the same building blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from rayapp.config.base import DeployConfig

# vLLM accepts these LoRA ranks for max_lora_rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def key_digest(key: str) -> str:
    """What the ingress holds instead of the key itself, so the key never shows in Serve's config or logs."""
    return hashlib.sha256(key.encode()).hexdigest()


class APIKeyMiddleware:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app, key_sha256: str):
        self.app = app
        self.key_sha256 = key_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1").strip()
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token and hmac.compare_digest(key_digest(token), self.key_sha256):
            return await self.app(scope, receive, send)
        message = (
            "missing API key: send it as the header `Authorization: Bearer KEY`"
            if not token else "invalid API key"
        )
        body = json.dumps({"error": {"message": message, "type": "authentication_error",
                                     "param": None, "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class ChatShapeMiddleware:
    """ASGI middleware: a chat body whose ``messages`` is not a list of objects gets a 400.

    pydantic validates ``messages`` lazily, so ``"messages": 5`` would otherwise fail inside the
    request parsing with a TypeError that the ingress reports as a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # malformed JSON: FastAPI answers 400 itself
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(data, dict) and "messages" in data and not (
                isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            found = type(messages).__name__
            payload = json.dumps({"error": {"message": f"invalid request: messages: expected a list of "
                                            f"{{role, content}} objects, got {found}",
                                            "type": "invalid_request_error", "param": "messages", "code": 400}})
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload.encode()})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def adapter_rank(adapter_dir: str | Path) -> int:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return int(cfg.get("r", 8))


def build_llm_config(model_dir: str | Path, name: str, deploy: DeployConfig, adapters: dict[str, str] | None = None):
    """The ``ray.serve.llm.LLMConfig`` for one model (and its adapters) from the deploy section."""
    from ray.serve.llm import LLMConfig

    adapters = adapters or {}
    engine_kwargs = {
        "enforce_eager": not deploy.use_gpu,
        "dtype": "auto" if deploy.use_gpu else "float32",
        "tensor_parallel_size": deploy.tensor_parallel_size,
        "max_num_seqs": deploy.max_num_seqs,
    }
    if deploy.max_model_len:
        engine_kwargs["max_model_len"] = deploy.max_model_len
    if adapters:
        rank = max(adapter_rank(d) for d in adapters.values())
        engine_kwargs.update(
            enable_lora=True,
            max_loras=max(1, len(adapters)),
            max_lora_rank=next(r for r in _VLLM_LORA_RANKS if r >= rank),
        )
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not deploy.use_gpu:
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(deploy.kv_cache_gib)
    config = dict(
        model_loading_config={"model_id": name, "model_source": str(model_dir)},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": deploy.min_replicas,
                "initial_replicas": max(1, deploy.min_replicas),
                "max_replicas": deploy.max_replicas,
                "target_ongoing_requests": deploy.target_ongoing_requests,
            },
        },
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": env_vars},
        accelerator_config={"kind": "gpu" if deploy.use_gpu else "cpu"},
    )
    if adapters:
        config["lora_config"] = {"max_num_adapters_per_replica": max(1, len(adapters))}
    return LLMConfig(**config)


def build_app(model_dir: str | Path, name: str, deploy: DeployConfig, adapters: dict[str, str] | None = None,
              api_key: str | None = None):
    """The Serve application: one ``LLMServer`` deployment behind the OpenAI ingress (with auth if a key is given)."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from rayapp.serving.server import RayappIngress, RayappLLMServer, ingress_fastapi_app, to_model_metadata

    adapters = {k: str(Path(v).resolve()) for k, v in (adapters or {}).items()}
    llm_config = build_llm_config(model_dir, name, deploy, adapters)
    server = build_llm_deployment(llm_config, deployment_cls=RayappLLMServer, bind_kwargs={"adapters": adapters})
    app = ingress_fastapi_app()
    app.add_middleware(ChatShapeMiddleware)
    if api_key:  # added last, so it runs first
        app.add_middleware(APIKeyMiddleware, key_sha256=key_digest(api_key))
    ingress_cls = RayappIngress
    options = ingress_cls.get_deployment_options([llm_config])
    options["name"] = "OpenAiIngress"
    options["ray_actor_options"] = {"num_cpus": 0.1 if not deploy.use_gpu else 1}
    return serve.deployment(make_fastapi_ingress(ingress_cls, app=app), **options).bind(
        llm_deployments={name: server},
        model_cards={name: to_model_metadata(name, llm_config)},
        adapter_names=sorted(adapters),
    )


def read_api_key(deploy: DeployConfig) -> str | None:
    """The API key from ``deploy.api_key_env`` or ``deploy.api_key_file`` (None when neither is set)."""
    from rayapp.serving.errors import DeployError

    if deploy.api_key_env and deploy.api_key_file:
        raise DeployError("deploy.api_key_env and deploy.api_key_file are both set; give one of them")
    if deploy.api_key_env:
        key = os.environ.get(deploy.api_key_env, "").strip()
        if not key:
            raise DeployError(
                f"deploy.api_key_env: environment variable {deploy.api_key_env} is not set or empty; "
                "export it (e.g. `export {0}=$(openssl rand -hex 16)`) or drop api_key_env".format(deploy.api_key_env)
            )
        return key
    if deploy.api_key_file:
        path = Path(deploy.api_key_file).expanduser()
        if not path.is_file():
            raise DeployError(f"deploy.api_key_file: {path} does not exist; write the key into it or drop api_key_file")
        key = path.read_text().strip()
        if not key:
            raise DeployError(f"deploy.api_key_file: {path} is empty; write the key into it")
        return key
    return None
