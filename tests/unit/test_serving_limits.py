"""Request limits and OpenAI-shaped errors on the serving ingress, against a fake ingress app.

The fake is a FastAPI app with the ingress's routes that records what reaches it and answers
errors the way ``ray.serve.llm`` does (bodies captured from a real tiny deployment), wrapped in
rayapp's middlewares exactly as :func:`rayapp.serving.app.build_app` wraps the real one.
"""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayapp.config.base import DeployConfig
from rayapp.serving.app import RequestLimits, add_middlewares, model_context_length

MAX_MODEL_LEN = 512

# What ray.serve.llm 2.60 answered on a real deployment (tiny model, max_model_len 512).
RAY_CONTEXT_ERROR = {"error": {
    "message": "Message: This model's maximum context length is 512 tokens. However, your prompt contains at least "
               "513 input tokens, which exceeds this limit even without any output tokens. Please reduce the length "
               "of the input prompt. (parameter=input_tokens, value=513) (Request ID: aeb6a702-e50a), Internal "
               "exception: ray.llm._internal.serve.core.configs.openai_api_models.OpenAIHTTPException (Request ID: "
               "aeb6a702-e50a), original exception: ",
    "type": "OpenAIHTTPException", "param": None, "code": 400}}
RAY_TEMPERATURE_ERROR = {"error": {
    "message": "Message: temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0) (Request ID: "
               "2e55c014), Internal exception: ray.llm._internal.serve.core.configs.openai_api_models."
               "OpenAIHTTPException (Request ID: 2e55c014), original exception: ",
    "type": "OpenAIHTTPException", "param": None, "code": 400}}
RAY_VALIDATION_ERROR = {"error": {
    "message": "Invalid request format: Input should be a valid integer, unable to parse string as an integer at "
               "('body', 'max_tokens')",
    "type": "int_parsing", "param": "many", "code": "invalid_parameter"}}
RAY_MODEL_DATA_ERROR = {"error": {
    "message": "Message: Unable to find nope. Please ensure that the model exists and you have permission. (Request "
               "ID: 3e17c897), Internal exception: ray.llm._internal.serve.core.configs.openai_api_models."
               "OpenAIHTTPException (Request ID: 3e17c897), original exception: ",
    "type": "InvalidModel", "param": None, "code": 404}}
RAY_INTERNAL_ERROR = {"error": {"message": "Message: Internal Server Error (Request ID: 1), Internal exception: "
                                           "Internal Server Error (Request ID: 1), original exception: boom",
                                "type": "InternalServerError", "param": None, "code": 500}}
# What ray.serve.llm's get_response_for_error makes of a ray.exceptions.ActorDiedError (the LLM replica killed).
RAY_REPLICA_DIED = {"error": {"message": "Message: Internal Server Error (Request ID: rid), Internal exception: "
                                         "Internal Server Error (Request ID: rid), original exception: The actor "
                                         "died unexpectedly before finishing this task.",
                              "type": "InternalServerError", "param": None, "code": 500}}


def fake_ingress(seen: list) -> FastAPI:
    app = FastAPI()

    async def generate(request: Request):
        body = json.loads(await request.body())
        seen.append(body)
        if body.get("model") == "nope":  # as RayappIngress raises it
            raise HTTPException(404, {"message": "unknown model 'nope'; this deployment serves: m",
                                      "param": "model", "code": "model_not_found"})
        answer = body.get("answer")
        if answer:
            return JSONResponse(answer["body"], status_code=answer["status"])
        if body.get("stream"):
            async def chunks():
                for i in range(3):
                    yield f"data: {json.dumps({'i': i})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return {"choices": [{"text": "ok"}], "got": body}

    app.post("/v1/completions")(generate)
    app.post("/v1/chat/completions")(generate)
    app.get("/v1/models")(lambda: {"data": [{"id": "m"}]})

    @app.get("/v1/models/{model}")
    async def model_data(model: str):
        return JSONResponse(RAY_MODEL_DATA_ERROR, status_code=404)

    return app


def make_client(api_key: str | None = None, **deploy) -> tuple[TestClient, list]:
    seen: list = []
    app = add_middlewares(fake_ingress(seen), DeployConfig(**{"max_model_len": MAX_MODEL_LEN, **deploy}),
                          api_key=api_key)
    return TestClient(app, raise_server_exceptions=False), seen


@pytest.fixture
def client():
    return make_client()


def assert_openai_error(resp, status: int, param=None, code=None, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert (err["param"], err["code"]) == (param, code), err
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    assert "Internal exception" not in err["message"] and "Request ID" not in err["message"]
    return err


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "m", "prompt": "hi", "n": 1000}),
    ("/v1/chat/completions", {"model": "m", "messages": CHAT, "n": 1000}),
    ("/v1/chat/completions", {"model": "m", "messages": CHAT, "n": 1000, "stream": True}),
])
def test_n_above_max_n_is_a_400_before_the_engine(client, path, body):
    http, seen = client
    assert_openai_error(http.post(path, json=body), 400, "n", "limit_exceeded", "n: 1000", "at most 8",
                        "deploy.max_n")
    assert seen == []  # nothing reached the ingress


def test_best_of_and_prompt_lists_count_against_max_n(client):
    http, seen = client
    assert_openai_error(http.post("/v1/completions", json={"model": "m", "prompt": "hi", "best_of": 9}), 400,
                        "best_of", "limit_exceeded", "best_of: 9", "deploy.max_n")
    assert_openai_error(http.post("/v1/completions", json={"model": "m", "prompt": ["a"] * 9}), 400,
                        "prompt", "limit_exceeded", "9 prompts", "deploy.max_n")
    assert_openai_error(http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b", "c"], "n": 3}), 400,
                        "prompt", "limit_exceeded", "3 prompts x 3 completions each = 9")
    assert seen == []
    ok = [{"model": "m", "prompt": "hi", "n": 8}, {"model": "m", "prompt": ["a"] * 8},
          {"model": "m", "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},  # one prompt of token ids
          {"model": "m", "prompt": [[1, 2], [3]], "n": 4}]
    for body in ok:
        assert http.post("/v1/completions", json=body).status_code == 200, body
    assert seen == ok  # forwarded unchanged


@pytest.mark.parametrize("path, field", [("/v1/completions", "max_tokens"),
                                         ("/v1/chat/completions", "max_tokens"),
                                         ("/v1/chat/completions", "max_completion_tokens")])
def test_token_caps(path, field):
    http, seen = make_client(max_model_len=None, max_tokens_limit=100)
    body = {"model": "m", "prompt": "hi", "messages": CHAT}
    assert_openai_error(http.post(path, json={**body, field: 10**9}), 400, field, "limit_exceeded",
                        f"{field}: 1000000000", "at most 100 tokens", "deploy.max_tokens_limit")
    assert_openai_error(http.post(path, json={**body, field: 101, "stream": True}), 400, field, "limit_exceeded")
    assert seen == []
    assert http.post(path, json={**body, field: 100}).status_code == 200


def test_max_tokens_beyond_the_context_names_max_model_len():
    http, seen = make_client(max_model_len=512, max_tokens_limit=2048)
    err = assert_openai_error(http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1000}),
                              400, "max_tokens", "context_length_exceeded", "context length of 512",
                              "deploy.max_model_len")
    assert "1000" in err["message"] and seen == []


def test_chat_without_a_token_cap_gets_the_deployment_cap():
    http, seen = make_client(max_model_len=None, max_tokens_limit=64)
    assert http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT}).status_code == 200
    assert seen[-1] == {"model": "m", "messages": CHAT, "max_completion_tokens": 64}
    # the context already bounds it: left alone
    http, seen = make_client(max_model_len=64, max_tokens_limit=64)
    assert http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT}).status_code == 200
    assert seen[-1] == {"model": "m", "messages": CHAT}
    # completions default to 16 tokens (OpenAI's default): left alone
    http, seen = make_client(max_model_len=None, max_tokens_limit=64)
    assert http.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200
    assert seen[-1] == {"model": "m", "prompt": "x"}


def test_oversize_body_is_a_413_declared_or_not():
    http, seen = make_client(max_body_bytes=4096)
    big = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
    assert_openai_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                        413, None, "request_too_large", f"request body: {len(big)} bytes", "at most 4096 bytes",
                        "deploy.max_body_bytes")

    def chunked():  # no Content-Length: the middleware counts while it reads
        for _ in range(10):
            yield b"x" * 1000
    assert_openai_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                        413, None, "request_too_large", "more than 4096 bytes")
    assert seen == []
    fits = {"model": "m", "prompt": "x" * 3500}
    assert http.post("/v1/completions", json=fits).status_code == 200 and seen == [fits]


def test_unknown_model_path_and_method_are_404_405_in_openai_shape(client):
    http, _ = client
    assert_openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "model",
                        "model_not_found", "unknown model 'nope'", "serves: m")
    assert_openai_error(http.get("/v1/models/nope"), 404, "model", "model_not_found", "Unable to find nope")
    assert_openai_error(http.post("/v1/nothing", json={}), 404, None, "unknown_url", "POST /v1/nothing",
                        "POST /v1/chat/completions")
    assert_openai_error(http.get("/v1/completions"), 405, None, None, "method GET", "POST /v1/completions")


@pytest.mark.parametrize("answer, status, param, code, needles", [
    (RAY_CONTEXT_ERROR, 400, "prompt", "context_length_exceeded", ["maximum context length is 512", "513 input"]),
    (RAY_TEMPERATURE_ERROR, 400, "temperature", None, ["temperature must be non-negative, got -1.0."]),
    (RAY_VALIDATION_ERROR, 400, "max_tokens", "invalid_parameter", ["max_tokens: Input should be a valid integer"]),
    (RAY_INTERNAL_ERROR, 500, None, None, ["Internal Server Error"]),
    ({"detail": "Not Found"}, 404, None, "unknown_url", ["unknown path: POST /v1/completions"]),
    ("plain text failure", 502, None, None, ["plain text failure"]),
])
def test_ray_serve_llm_errors_are_rewritten(client, answer, status, param, code, needles):
    http, _ = client
    body = {"model": "m", "prompt": "hi", "answer": {"status": status, "body": answer}}
    err = assert_openai_error(http.post("/v1/completions", json=body), status, param, code, *needles)
    assert "(parameter=" not in err["message"]


def test_a_dead_replica_is_a_503_that_says_to_retry(client):
    http, _ = client
    resp = http.post("/v1/completions", json={"model": "m", "prompt": "hi",
                                              "answer": {"status": 500, "body": RAY_REPLICA_DIED}})
    assert_openai_error(resp, 503, None, "replica_unavailable", "replica stopped", "retry")
    assert resp.headers["retry-after"] == "5"


def test_context_error_on_chat_names_messages(client):
    http, _ = client
    body = {"model": "m", "messages": CHAT, "answer": {"status": 400, "body": RAY_CONTEXT_ERROR}}
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "messages", "context_length_exceeded")


def test_successful_responses_and_streams_pass_through(client):
    http, _ = client
    ok = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"] == [{"text": "ok"}]
    with http.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line]
    assert lines == ['data: {"i": 0}', 'data: {"i": 1}', 'data: {"i": 2}', "data: [DONE]"]
    assert http.get("/v1/models").json() == {"data": [{"id": "m"}]}


def test_wrong_types_are_left_to_the_ingress_validation(client):
    http, seen = client
    body = {"model": "m", "prompt": "hi", "n": "many", "max_tokens": "lots", "best_of": None}
    assert http.post("/v1/completions", json=body).status_code == 200 and seen == [body]
    assert http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}) \
        .status_code in (400, 422, 500)  # the fake's own JSON error; the real ingress answers 400


def test_api_key_is_checked_before_anything_else():
    http, seen = make_client(api_key="k1", max_body_bytes=2048)
    resp = http.post("/v1/completions", json={"model": "m", "prompt": "x" * 5000, "n": 1000})
    err = resp.json()["error"]
    assert resp.status_code == 401 and (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")
    auth = {"Authorization": "Bearer k1"}
    assert http.post("/v1/completions", json={"model": "m", "prompt": "hi", "n": 1000}, headers=auth) \
        .status_code == 400
    assert http.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers=auth).status_code == 200
    assert len(seen) == 1


JSON_SCALARS = st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELDS = st.sampled_from(["n", "best_of", "max_tokens", "max_completion_tokens", "prompt", "messages", "stream"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(FIELDS, JSON_VALUES, max_size=6))
def test_any_body_is_forwarded_or_refused_in_shape(client, path, body):
    """Whatever the fields hold, the middleware forwards the request or answers a 400 in OpenAI's
    shape naming the field; it never fails itself."""
    http, seen = client
    before = len(seen)
    resp = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    if resp.status_code == 200:
        assert len(seen) == before + 1
        forwarded = seen[-1]
        assert {k: v for k, v in forwarded.items() if k != "max_completion_tokens"} == \
            {k: v for k, v in json.loads(json.dumps(body)).items() if k != "max_completion_tokens"}
    else:
        err = resp.json()["error"]
        assert resp.status_code == 400 and len(seen) == before, resp.text
        assert err["param"] in ("n", "best_of", "prompt", "max_tokens", "max_completion_tokens", "messages")
        assert err["message"].startswith(err["param"] + ": ") or err["param"] == "messages"
        assert "deploy." in err["message"] or err["code"] == "invalid_type"


def test_limits_come_from_the_deploy_section_and_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    assert model_context_length(tmp_path) == 1024
    assert model_context_length(tmp_path / "missing") is None
    limits = RequestLimits.from_deploy(DeployConfig(), tmp_path)
    assert limits == RequestLimits(max_n=8, max_tokens=2048, max_body_bytes=1 << 20, max_model_len=1024)
    assert RequestLimits.from_deploy(DeployConfig(max_model_len=256), tmp_path).max_model_len == 256


# -- the deploy section: exposure without a key is refused at validation ---------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host.example"])
def test_non_loopback_host_without_a_key_is_refused(host):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        DeployConfig(host=host)
    text = str(e.value)
    for needle in (f"deploy.host: {host}", "deploy.api_key_env", "deploy.api_key_file",
                   "deploy.allow_unauthenticated: true", "export MY_KEY="):
        assert needle in text, needle
    assert DeployConfig(host=host, api_key_env="MY_KEY").host == host
    assert DeployConfig(host=host, api_key_file="/k").host == host
    assert DeployConfig(host=host, allow_unauthenticated=True).allow_unauthenticated


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_key(host):
    assert DeployConfig(host=host).host == host


def test_job_file_with_an_open_host_names_file_and_line(tmp_path):
    from rayapp.config import ConfigError, load_job

    job = tmp_path / "d.yaml"
    job.write_text("kind: deploy\nmodel: tiny\ndeploy:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError) as e:
        load_job(job)
    assert f"{job}:3: deploy: deploy.host: 0.0.0.0 serves other machines" in str(e.value)
    assert load_job(job, ["deploy.allow_unauthenticated=true"]).deploy.allow_unauthenticated
    assert load_job(job, ["deploy.api_key_env=K"]).deploy.api_key_env == "K"


def test_cli_refuses_an_open_host_before_starting_anything(capsys):
    from rayapp.cli import main

    assert main(["deploy", "tiny", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "deploy.host: 0.0.0.0" in err and "--allow-unauthenticated" in err and "Traceback" not in err
