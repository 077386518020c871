"""A tiny model and a LoRA adapter on Ray Serve (ray.serve.llm + vLLM CPU), called with the `openai` client.

One deployment for the whole module (engine start is the slow part): the tiny Llama as
``tiny-served`` with the adapter ``support``, behind an API key, on the persistent local head.
Both are deployed from object storage: published to an S3 bucket (moto on 127.0.0.1) as a job
publishes its model/, and deployed by URI. Deploy downloads them into the local cache to check
them; the replica downloads them again into its node's cache (here: the same cached copy), so
every test below also shows that a deployment from an ``s3://`` output_dir serves.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import free_port, make_adapter

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"
MODEL = "tiny-served"


@pytest.fixture(scope="module")
def published(tiny_model_dir, s3_server):
    """s3://BUCKET/served with model/ (the tiny Llama) and adapter/ published as a job publishes them."""
    import shutil

    from rayapp.storage import open_output

    uri = f"s3://{s3_server.create_bucket()}/served"
    with open_output(uri) as store:
        shutil.copytree(tiny_model_dir, store.path("model"))
        make_adapter(tiny_model_dir, store.path("adapter"))
        store.publish_dir("model")
        store.publish_dir("adapter")
    return uri


@pytest.fixture(scope="module")
def served(published, tmp_path_factory):
    """Deploy once from S3; yield the DeployInfo; remove the app (and the head this module started)."""
    import ray

    from rayapp.config.base import DeployConfig
    from rayapp.serving import local_head
    from rayapp.serving.deploy import deploy_model

    tmp = tmp_path_factory.mktemp("serving")
    own_head = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if own_head:
        os.environ["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp / "local_cluster.json")
    os.environ["RAYAPP_TEST_KEY"] = KEY
    deploy = DeployConfig(enabled=True, port=free_port(), max_model_len=512, api_key_env="RAYAPP_TEST_KEY")
    try:
        info = deploy_model(published, {"support": f"{published}/adapter"}, deploy, MODEL)
        yield info
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.delete(MODEL)
            if own_head:
                serve.shutdown()
                ray.shutdown()
        if own_head:
            local_head.stop_local_head()
            os.environ.pop("RAY_ADDRESS", None)
            os.environ.pop("RAYAPP_LOCAL_CLUSTER_FILE", None)


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url, api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_base_and_adapter(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {MODEL, "support"}


def test_chat_and_completion_plain_and_streaming(client):
    messages = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert streamed == chat.choices[0].message.content  # greedy: same text streamed or not

    comp = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=8, temperature=0)
    assert comp.usage.completion_tokens > 0
    pieces = list(client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == comp.choices[0].text


def test_adapter_changes_output(client):
    def greedy(model):
        out = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0,
                                        logprobs=1)
        return out.choices[0].text, out.choices[0].logprobs.token_logprobs

    base_text, base_lp = greedy(MODEL)
    lora_text, lora_lp = greedy("support")
    assert (base_text, base_lp) != (lora_text, lora_lp)
    assert greedy("support")[0] == lora_text  # and the adapter's output is itself deterministic


def test_missing_or_wrong_key_is_401(served):
    import httpx

    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    no_key = httpx.post(f"{served.url}/completions", json=body, timeout=60)
    assert no_key.status_code == 401
    assert "Authorization: Bearer" in no_key.json()["error"]["message"]
    wrong = httpx.post(f"{served.url}/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401
    assert httpx.get(f"{served.url}/models", timeout=60).status_code == 401

    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    "case, body, raw",
    [
        ("unknown model", {"model": "nope", "prompt": "hi", "max_tokens": 2}, None),
        ("unknown adapter", {"model": f"{MODEL}:nope", "prompt": "hi", "max_tokens": 2}, None),
        ("malformed json", None, b'{"model": "tiny-served", "prompt": '),
        ("max_tokens beyond context", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, None),
        ("wrong type max_tokens", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, None),
        ("wrong type prompt", {"model": MODEL, "prompt": {"a": 1}, "max_tokens": 2}, None),
        ("negative temperature", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": -1}, None),
    ],
)
def test_bad_requests_get_4xx_with_a_message(served, case, body, raw):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{served.url}/completions"
    resp = httpx.post(url, content=raw, headers=headers, timeout=60) if raw else \
        httpx.post(url, json=body, headers=headers, timeout=60)
    assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text)
    err = assert_openai_shape(resp)
    assert err["message"] and "Internal exception" not in err["message"], (case, resp.text)


def test_bad_chat_request_gets_4xx(served):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(f"{served.url}/chat/completions", json={"model": MODEL, "messages": 5}, headers=headers,
                      timeout=60)
    assert 400 <= resp.status_code < 500, resp.text
    assert assert_openai_shape(resp)["param"] == "messages"


def assert_openai_shape(resp) -> dict:
    """The body is OpenAI's error shape, and nothing else; returns its ``error``."""
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, resp.text
    expected = "invalid_request_error" if resp.status_code < 500 else "server_error"
    assert body["error"]["type"] == expected, resp.text
    return body["error"]


# -- request limits (deploy.max_n 8, max_tokens_limit 2048, max_body_bytes 1 MiB: the defaults; max_model_len 512)

LONG_PROMPT = "hello world " * 400  # more than 512 tokens, far less than 1 MiB
LIMIT_CASES = [
    # case, path, body, status, param, code, words in the message
    ("n 1000", "completions", {"prompt": "hi", "n": 1000}, 400, "n", "limit_exceeded", ["n: 1000", "deploy.max_n"]),
    ("n 1000 chat stream", "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1000,
                                                "stream": True}, 400, "n", "limit_exceeded", ["deploy.max_n"]),
    ("9 prompts", "completions", {"prompt": ["a"] * 9}, 400, "prompt", "limit_exceeded", ["9 prompts"]),
    ("huge max_tokens", "completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens", "limit_exceeded",
     ["1000000000", "at most 2048", "deploy.max_tokens_limit"]),
    ("huge max_completion_tokens stream", "chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9, "stream": True}, 400,
     "max_completion_tokens", "limit_exceeded", ["deploy.max_tokens_limit"]),
    ("max_tokens beyond the context", "completions", {"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens",
     "context_length_exceeded", ["context length of 512", "deploy.max_model_len"]),
    ("over-long prompt", "completions", {"prompt": LONG_PROMPT, "max_tokens": 2}, 400, "prompt",
     "context_length_exceeded", ["maximum context length is 512"]),
    ("over-long prompt chat stream", "chat/completions",
     {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 2, "stream": True}, 400, "messages",
     "context_length_exceeded", ["maximum context length is 512"]),
    ("oversize body", "completions", {"prompt": "x" * (2 << 20), "max_tokens": 2}, 413, None, "request_too_large",
     ["at most 1048576 bytes", "deploy.max_body_bytes"]),
    ("unknown model", "completions", {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found",
     ["unknown model 'nope'", MODEL]),
    ("unknown path", "nothing/here", {"prompt": "hi"}, 404, None, "unknown_url", ["POST /v1/nothing/here"]),
]


@pytest.mark.parametrize("case, path, body, status, param, code, words", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_request_limits_raw_http(served, case, path, body, status, param, code, words):
    import httpx

    resp = httpx.post(f"{served.url}/{path}", json={"model": MODEL, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == status, (case, resp.text[:500])
    err = assert_openai_shape(resp)
    assert (err["param"], err["code"]) == (param, code), (case, err)
    for word in words:
        assert word in err["message"], (case, word, err["message"])


def test_request_limits_with_the_openai_client(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", n=1000)
    assert (e.value.code, e.value.param) == ("limit_exceeded", "n") and "deploy.max_n" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # streaming is limited the same way
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=10**9, stream=True))
    assert (e.value.code, e.value.param) == ("limit_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=2)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x" * (2 << 20), max_tokens=2)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    # at the limits, requests are served
    out = client.completions.create(model=MODEL, prompt="hi", n=8, max_tokens=2)
    assert len(out.choices) == 8


def test_status_lists_the_deployment(served):
    from rayapp.serving.deploy import status

    rows = {r["name"]: r for r in status()}
    assert rows[MODEL]["state"] == "RUNNING"
    assert rows[MODEL]["url"] == served.url


# -- a fault: the LLM replica killed under load. Last in the module: it leaves a new replica behind.

CLIENTS = 16
REQUEST_TIMEOUT_S = 90  # each client's bound on one request (Serve queues requests while no replica is up)
RECOVERY_LIMIT_S = 240


def llm_replica_processes() -> tuple[int, set[int]]:
    """(pid, descendants) of this module's LLM replica: the process titled
    ``ray::ServeReplica:<app>:RayappLLMServer:<app>``, and its vLLM EngineCore / Worker processes."""
    import psutil

    title = f"ray::ServeReplica:{MODEL}:RayappLLMServer:{MODEL}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].strip().startswith(title):
            found.append(proc)
    assert len(found) == 1, f"expected one process titled {title}, found {[p.pid for p in found]}"
    return found[0].pid, {c.pid for c in found[0].children(recursive=True)}


def test_llm_replica_killed_under_load_recovers(served):
    """16 bounded clients on loopback; the replica process is SIGKILLed mid-load. Serve starts a new one by
    itself; the share of failed requests is printed and bounded, failures say to retry (503), and every
    request sent after recovery succeeds."""
    import signal
    import threading
    import time

    import httpx
    import psutil

    from rayapp.serving.deploy import status

    pid, engine_pids = llm_replica_processes()
    assert engine_pids, "the replica should have its vLLM engine processes as children"
    results: list[tuple[float, float, object, str]] = []  # (sent, done, status or exception name, code)
    lock, stop = threading.Lock(), threading.Event()
    t0 = time.monotonic()

    def one_client(k: int) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": MODEL, "prompt": f"client {k} says", "max_tokens": 8, "temperature": 0}
        with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers) as http:
            while not stop.is_set():
                sent = time.monotonic() - t0
                try:
                    resp = http.post(f"{served.url}/completions", json=body)
                    outcome, code = resp.status_code, ""
                    if resp.status_code != 200:
                        code = str(assert_openai_shape(resp)["code"])
                except httpx.HTTPError as e:
                    outcome, code = type(e).__name__, str(e)[:100]
                with lock:
                    results.append((sent, time.monotonic() - t0, outcome, code))
                if outcome != 200:
                    time.sleep(1.0)  # a client backs off after a failure instead of spinning

    threads = [threading.Thread(target=one_client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(8)
    with lock:
        assert sum(1 for r in results if r[2] == 200) >= CLIENTS, f"no steady load before the kill: {results[-5:]}"
    killed_at = time.monotonic() - t0
    psutil.Process(pid).send_signal(signal.SIGKILL)

    recovered_at = None
    while recovered_at is None and time.monotonic() - t0 - killed_at < RECOVERY_LIMIT_S:
        time.sleep(1)
        with lock:
            ok_after = [done for sent, done, outcome, _ in results if sent > killed_at and outcome == 200]
        recovered_at = min(ok_after) if ok_after else None
    if recovered_at is not None:
        time.sleep(10)  # load after recovery
    stop.set()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 5)

    failed = [r for r in results if r[2] != 200]
    share = len(failed) / len(results)
    kinds = sorted({(r[2], r[3]) for r in failed}, key=str)
    recovery = None if recovered_at is None else recovered_at - killed_at
    print(f"\nreplica kill under load: {len(results)} requests from {CLIENTS} clients, {len(failed)} failed "
          f"({share:.1%}); recovered {recovery if recovery is None else round(recovery, 1)} s after the kill; "
          f"failures: {kinds}")
    assert recovered_at is not None, f"no request succeeded within {RECOVERY_LIMIT_S} s of the kill"
    assert share < 0.5, f"{share:.0%} of requests failed"
    after = [r for r in results if r[0] > recovered_at + 1]
    assert len(after) >= CLIENTS and all(r[2] == 200 for r in after), [r for r in after if r[2] != 200][:5]
    # what failed failed in a way a client can act on: a 503 saying to retry, or its own timeout
    for outcome, code in kinds:
        assert (outcome, code) == (503, "replica_unavailable") or outcome == "ReadTimeout", (outcome, code)
    new_pid, _ = llm_replica_processes()
    assert new_pid != pid
    left = [p for p in engine_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"the killed replica's engine processes {left} outlived it"
    assert {r["name"]: r for r in status()}[MODEL]["state"] == "RUNNING"
