"""A tiny model and a LoRA adapter on Ray Serve (ray.serve.llm + vLLM CPU), called with the `openai` client.

One deployment for the whole module (engine start is the slow part): the tiny Llama as
``tiny-served`` with the adapter ``support``, behind an API key, on the persistent local head.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"
MODEL = "tiny-served"


def make_adapter(base_dir, out_dir, seed: int = 0):
    """A LoRA adapter for the tiny model whose lora_B is perturbed, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rayapp.models.io import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(str(base_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """Deploy once; yield the DeployInfo; remove the app (and the head this module started)."""
    import ray

    from rayapp.config.base import DeployConfig
    from rayapp.serving import local_head
    from rayapp.serving.deploy import deploy_model

    tmp = tmp_path_factory.mktemp("serving")
    adapter = make_adapter(tiny_model_dir, tmp / "adapter")
    own_head = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if own_head:
        os.environ["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp / "local_cluster.json")
    os.environ["RAYAPP_TEST_KEY"] = KEY
    deploy = DeployConfig(enabled=True, port=free_port(), max_model_len=512, api_key_env="RAYAPP_TEST_KEY")
    try:
        info = deploy_model(tiny_model_dir, {"support": str(adapter)}, deploy, MODEL)
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
    err = resp.json()
    message = err.get("error", {}).get("message") if isinstance(err.get("error"), dict) else err.get("detail")
    assert message, (case, resp.text)


def test_bad_chat_request_gets_4xx(served):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(f"{served.url}/chat/completions", json={"model": MODEL, "messages": 5}, headers=headers,
                      timeout=60)
    assert 400 <= resp.status_code < 500, resp.text


def test_status_lists_the_deployment(served):
    from rayapp.serving.deploy import status

    rows = {r["name"]: r for r in status()}
    assert rows[MODEL]["state"] == "RUNNING"
    assert rows[MODEL]["url"] == served.url
