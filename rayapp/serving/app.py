"""The OpenAI-compatible Serve application: ``ray.serve.llm`` with rayapp's auth and local LoRA adapters.

``ray.serve.llm`` does the serving (``LLMServer`` deployments running vLLM, the
``OpenAiIngress`` routes, streaming, multiplexed LoRA). rayapp adds:

- an API-key check in front of every route (a FastAPI/ASGI middleware on the ingress app);
- per-deployment request limits (``deploy.max_n``, ``deploy.max_tokens_limit``,
  ``deploy.max_body_bytes``, ``deploy.max_model_len``), checked on the ingress before a request
  reaches an engine (:class:`RequestLimitsMiddleware`);
- every error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
  (:class:`OpenAIErrorMiddleware`): FastAPI's ``{"detail": ...}`` (unknown path, unknown model) and
  ``ray.serve.llm``'s wrapped vLLM errors are rewritten into it;
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
import re
from dataclasses import dataclass
from pathlib import Path

from rayapp.config.base import DeployConfig

# vLLM accepts these LoRA ranks for max_lora_rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def key_digest(key: str) -> str:
    """What the ingress holds instead of the key itself, so the key never shows in Serve's config or logs."""
    return hashlib.sha256(key.encode()).hexdigest()


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> bytes:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return json.dumps({"error": {"message": message, "type": error_type(status), "param": param,
                                 "code": code}}).encode()


def error_type(status: int) -> str:
    """The OpenAI error ``type`` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 408: "server_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


async def send_error(send, status: int, message: str, param: str | None = None, code: str | int | None = None,
                     headers: list | None = None) -> None:
    body = error_body(status, message, param, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


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
        await send_error(send, 401, message, code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])


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
            await send_error(send, 400, f"invalid request: messages: expected a list of {{role, content}} objects, "
                             f"got {found}", param="messages", code="invalid_type")
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass(frozen=True)
class RequestLimits:
    """What one request to a deployment may ask for (from the deploy section; see SECURITY.md)."""

    max_n: int  # completions per request: n (or best_of) times the number of prompts
    max_tokens: int  # max_tokens / max_completion_tokens
    max_body_bytes: int
    max_model_len: int | None  # the engine's context length, when known

    @classmethod
    def from_deploy(cls, deploy: DeployConfig, model_dir: str | Path | None = None) -> RequestLimits:
        return cls(deploy.max_n, deploy.max_tokens_limit, deploy.max_body_bytes,
                   deploy.max_model_len or (model_context_length(model_dir) if model_dir else None))


# config.json keys that hold a model's context length, in the order vLLM looks at them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context_length(model_dir: str | Path) -> int | None:
    """The context length in a Hugging Face directory's config.json (None when it does not say)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _CONTEXT_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class LimitExceeded(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _prompt_count(prompt) -> int:
    """Prompts in a completions request: a string or a token-id list is one; a list of them is several."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def check_limits(body: dict, path: str, limits: RequestLimits) -> dict | None:
    """Raise LimitExceeded when a completions / chat body asks for more than ``limits`` allow.

    Returns the body to forward when it must change (a chat request without a token cap gets
    ``max_completion_tokens`` = the limit), else None. Fields of the wrong type are left to the
    ingress's own validation, which answers 400 for them."""
    chat = path.endswith("/chat/completions")
    n = _int(body.get("n"))
    if n is not None and n > limits.max_n:
        raise LimitExceeded(400, f"n: {n} completions asked for; this deployment allows at most {limits.max_n} per "
                                 f"request (deploy.max_n)", "n", "limit_exceeded")
    best_of = _int(body.get("best_of"))
    if best_of is not None and best_of > limits.max_n:
        raise LimitExceeded(400, f"best_of: {best_of}; this deployment allows at most {limits.max_n} sequences per "
                                 f"request (deploy.max_n)", "best_of", "limit_exceeded")
    if not chat:
        prompts = _prompt_count(body.get("prompt"))
        per_prompt = max(n or 1, best_of or 1)
        if prompts * per_prompt > limits.max_n:
            raise LimitExceeded(400, f"prompt: {prompts} prompts x {per_prompt} completions each = "
                                     f"{prompts * per_prompt}; this deployment allows at most {limits.max_n} "
                                     f"completions per request (deploy.max_n); send fewer prompts per request",
                                "prompt", "limit_exceeded")
    capped = False
    for field in ("max_tokens", "max_completion_tokens"):
        value = _int(body.get(field))
        if value is None:
            continue
        capped = True
        if value > limits.max_tokens:
            raise LimitExceeded(400, f"{field}: {value}; this deployment generates at most {limits.max_tokens} "
                                     f"tokens per completion (deploy.max_tokens_limit)", field, "limit_exceeded")
        if limits.max_model_len is not None and value > limits.max_model_len:
            raise LimitExceeded(400, f"{field}: {value} is more than the model's context length of "
                                     f"{limits.max_model_len} tokens (prompt and completion together; "
                                     f"deploy.max_model_len)", field, "context_length_exceeded")
    # Without a cap a chat completion runs to the end of the context; give it the deployment's cap.
    # (A completions request without max_tokens gets 16 tokens, OpenAI's default.)
    if chat and not capped and body.get("max_tokens") is None and body.get("max_completion_tokens") is None \
            and (limits.max_model_len is None or limits.max_model_len > limits.max_tokens):
        return {**body, "max_completion_tokens": limits.max_tokens}
    return None


class RequestLimitsMiddleware:
    """ASGI middleware: a request body over ``max_body_bytes`` gets a 413; a completions or chat
    request asking for more than the deployment allows (n, best_of, prompts, max_tokens) a 400,
    both in OpenAI's error shape, before anything reaches an engine. Streaming requests are
    checked the same way (``stream`` changes nothing here)."""

    def __init__(self, app, limits: RequestLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        allowed = f"this deployment accepts at most {limit} bytes per request (deploy.max_body_bytes)"
        if declared > limit:
            return await send_error(send, 413, f"request body: {declared} bytes; {allowed}", code="request_too_large")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a body sent without (or with a false) Content-Length: stop reading it
                return await send_error(send, 413, f"request body: more than {limit} bytes; {allowed}",
                                        code="request_too_large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope["path"].endswith("/completions"):
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                data = None  # malformed JSON: the ingress answers 400 itself
            if isinstance(data, dict):
                try:
                    changed = check_limits(data, scope["path"], self.limits)
                except LimitExceeded as e:
                    return await send_error(send, e.status, e.message, e.param, e.code)
                if changed is not None:
                    body = json.dumps(changed).encode()
                    scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or []
                                                 if k.lower() != b"content-length"]
                                 + [(b"content-length", str(len(body)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# What ray.serve.llm wraps vLLM's own message in: "Message: TEXT (Request ID: ...), Internal exception: ..."
_RAY_WRAPPED = re.compile(r"^Message: (?P<text>.*?)(?: \(Request ID: [^)]*\))?, Internal exception: ", re.S)
_VLLM_PARAM = re.compile(r" \(parameter=(?P<param>[\w.]+), value=[^)]*\)")
_PYDANTIC_LOC = re.compile(r"^Invalid request format: (?P<text>.*) at \('body', (?P<loc>.*)\)$", re.S)
# Ray's words for a call to an actor (here: the LLM replica) that died or went away mid-request.
_REPLICA_GONE = re.compile(r"actor (is dead|died)|ActorDiedError|ActorUnavailableError|RayActorError|"
                           r"actor is unavailable", re.I)
ROUTES = "GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions"


def openai_error(status: int, payload, method: str, path: str) -> tuple[int, dict]:
    """(status, body): an error response body (FastAPI's ``{"detail": ...}``, ray.serve.llm's wrapped
    vLLM error, its validation error, or plain text) rewritten into OpenAI's shape, with a message a
    person can act on. A 500 caused by the model's replica dying becomes a 503 that says to retry."""
    param, code = None, None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        message = str(err.get("message") or "")
        if status == 500 and _REPLICA_GONE.search(message):
            return 503, {"error": {
                "message": "the model's replica stopped while serving this request; Ray Serve is starting a new "
                           "one: retry in a few seconds", "type": "server_error", "param": None,
                "code": "replica_unavailable"}}
        param = err.get("param") if isinstance(err.get("param"), str) else None
        code = err.get("code")
        if err.get("type") == "InvalidModel":
            code, param = "model_not_found", "model"
        m = _RAY_WRAPPED.match(message)
        if m:
            message = m.group("text")
        m = _VLLM_PARAM.search(message)
        if m:
            message, param = message.replace(m.group(0), ""), m.group("param")
        m = _PYDANTIC_LOC.match(message)
        if m:  # ray.serve.llm's validation error puts the bad value in param; name the field instead
            loc = [p.strip(" '\"") for p in m.group("loc").split(",") if p.strip(" '\"")]
            param = ".".join(loc) if loc and not loc[0].isdigit() else None
            message = f"invalid request body: {param + ': ' if param else ''}{m.group('text')}"
    elif isinstance(payload, dict) and "detail" in payload:
        detail = payload["detail"]
        if isinstance(detail, dict):  # rayapp's own HTTPExceptions: {"message", "param", "code"}
            message, param, code = str(detail.get("message", "")), detail.get("param"), detail.get("code")
        elif isinstance(detail, list):  # FastAPI's validation errors
            message = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}"
                                if isinstance(d, dict) else str(d) for d in detail)
        else:
            message = str(detail)
    else:
        message = payload if isinstance(payload, str) else json.dumps(payload)
    if status == 404 and message == "Not Found":
        message, code = f"unknown path: {method} {path}; this server answers {ROUTES}", "unknown_url"
    elif status == 405 and message == "Method Not Allowed":
        message = f"method {method} is not allowed on {path}; this server answers {ROUTES}"
    if "maximum context length" in message:
        code = "context_length_exceeded"
        if param in (None, "input_tokens", "input_text"):
            param = "messages" if path.endswith("/chat/completions") else "prompt"
    if status >= 500 and not message:
        message = "internal server error"
    return status, {"error": {"message": message.strip() or f"HTTP {status}", "type": error_type(status),
                              "param": param, "code": code if isinstance(code, str) else None}}


class OpenAIErrorMiddleware:
    """ASGI middleware: every error response (status >= 400) leaves in OpenAI's shape
    ``{"error": {"message", "type", "param", "code"}}``. Successful responses, streams included,
    pass through untouched (nothing is buffered for them)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def send_wrapper(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                return await send(message)
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                raw = b"".join(chunks)
                try:
                    payload = json.loads(raw)
                except (ValueError, RecursionError):
                    payload = raw.decode("utf-8", "replace")
                status, error = openai_error(start["status"], payload, scope.get("method", ""), scope.get("path", ""))
                body = json.dumps(error).encode()
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() not in (b"content-length", b"content-type")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if status == 503:
                    headers.append((b"retry-after", b"5"))
                await send({**start, "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_wrapper)


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
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                # the engine's INFO lines (config dumps, per-interval throughput) stay in the replica's log file
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
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


def add_middlewares(app, deploy: DeployConfig, model_dir: str | Path | None = None, api_key: str | None = None):
    """rayapp's middlewares on the ingress's FastAPI app. Starlette runs the one added last first:
    API key, then error shape, then request limits, then the chat-shape check."""
    app.add_middleware(ChatShapeMiddleware)
    app.add_middleware(RequestLimitsMiddleware, limits=RequestLimits.from_deploy(deploy, model_dir))
    app.add_middleware(OpenAIErrorMiddleware)
    if api_key:
        app.add_middleware(APIKeyMiddleware, key_sha256=key_digest(api_key))
    return app


def build_app(model_dir: str | Path, name: str, deploy: DeployConfig, adapters: dict[str, str] | None = None,
              api_key: str | None = None, sources: dict | None = None):
    """The Serve application: one ``LLMServer`` deployment behind the OpenAI ingress (with auth if a key is given).

    ``model_dir`` and ``adapters`` are local directories here. ``sources``: ``{"model": OutputStore or
    None, "adapters": {name: OutputStore}}`` for those that came from object storage
    (:meth:`rayapp.serving.deploy.Source.stores`); each replica downloads them into its own node's
    cache (``store.fetch_dir()``) before its engine starts, so a replica on another node finds them."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from rayapp.serving.server import RayappIngress, RayappLLMServer, ingress_fastapi_app, to_model_metadata

    adapters = {k: str(Path(v).resolve()) for k, v in (adapters or {}).items()}
    llm_config = build_llm_config(model_dir, name, deploy, adapters)
    server = build_llm_deployment(llm_config, deployment_cls=RayappLLMServer,
                                  bind_kwargs={"adapters": adapters, "sources": sources or {}})
    app = ingress_fastapi_app()
    add_middlewares(app, deploy, model_dir, api_key)
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
