"""The reward-model endpoint: POST /v1/score on Ray Serve, behind an API key, for RLHF that scores over HTTP."""

from __future__ import annotations

import os

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

KEY = "reward-key-42"
NAME = "rm-tiny"


@pytest.fixture(scope="module")
def reward_endpoint(tiny_model_dir, tmp_path_factory):
    import ray

    from rayapp.config.base import DeployConfig
    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import load_reward_model, save_reward_model
    from rayapp.serving import local_head
    from rayapp.serving.deploy import deploy_reward_model

    tmp = tmp_path_factory.mktemp("reward")
    tok = load_tokenizer(str(tiny_model_dir))
    save_reward_model(load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id or tok.eos_token_id), tok,
                      tmp / "rm")
    # As a reward_model job trained with data.chat_template: never leaves it: conversations are scored as plain text.
    (tmp / "config.resolved.yaml").write_text("kind: reward_model\ndata: {chat_template: never}\n")
    own_head = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if own_head:
        os.environ["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp / "local_cluster.json")
    os.environ["RAYAPP_RM_KEY"] = KEY
    deploy = DeployConfig(enabled=True, port=free_port(), api_key_env="RAYAPP_RM_KEY", max_model_len=128)
    try:
        info = deploy_reward_model(str(tmp / "rm"), deploy, NAME)
        info.model_dir = tmp / "rm"  # for rescoring locally in the tests
        yield info
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.delete(NAME)
            if own_head:
                serve.shutdown()
                ray.shutdown()
        if own_head:
            local_head.stop_local_head()
            os.environ.pop("RAY_ADDRESS", None)
            os.environ.pop("RAYAPP_LOCAL_CLUSTER_FILE", None)


def _post(endpoint, body, key=KEY):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{endpoint.url}/score", json=body, headers=headers, timeout=120)


def test_scores_texts_and_conversations(reward_endpoint):
    import torch

    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import load_reward_model, reward_scores

    texts = ["2+2=4", "2+2=5", "the sky is green"]
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    resp = _post(reward_endpoint, {"model": NAME, "input": [*texts, conv]})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3]
    scores = [d["score"] for d in data]
    assert len(set(scores)) == 4  # a random head still tells different inputs apart

    # The served scores equal the saved model's, scored here one text at a time (no padding effects).
    tok = load_tokenizer(str(reward_endpoint.model_dir))
    model = load_reward_model(reward_endpoint.model_dir).eval()
    for text, served in zip(texts, scores, strict=False):
        ids = tok(text, return_tensors="pt")
        with torch.inference_mode():
            local = reward_scores(model, ids["input_ids"], ids["attention_mask"]).item()
        assert served == pytest.approx(local, abs=1e-4)
    # The conversation is rendered as the model was trained (its job's chat_template: never), and
    # scores what the RLHF reward actor gives the same conversation.
    from rayapp.data.tokenize import render_conversation
    from rayapp.training.rlhf_rollout import RewardModelActor

    plain = tok(render_conversation(tok, conv, "never"), add_special_tokens=False, return_tensors="pt")
    templated = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        want = reward_scores(model, plain["input_ids"], plain["attention_mask"]).item()
        other = reward_scores(model, templated["input_ids"], templated["attention_mask"]).item()
    assert scores[3] == pytest.approx(want, abs=1e-4) and abs(want - other) > 1e-4
    assert RewardModelActor(str(reward_endpoint.model_dir)).score([conv])[0] == pytest.approx(scores[3], abs=1e-4)


def test_reward_auth_and_bad_requests(reward_endpoint):
    import httpx

    assert _post(reward_endpoint, {"input": ["x"]}, key=None).status_code == 401
    assert _post(reward_endpoint, {"input": ["x"]}, key="wrong").status_code == 401
    assert _post(reward_endpoint, {"model": "other", "input": ["x"]}).status_code == 404
    for bad in ({"input": []}, {"input": "not a list"}, {"input": [5]}, {"inputs": ["typo"]},
                {"input": [[{"role": "robot", "content": "x"}]]}):
        resp = _post(reward_endpoint, bad)
        assert resp.status_code == 400, (bad, resp.status_code, resp.text)
        assert resp.json()["error"]["message"].startswith("invalid request")
    raw = httpx.post(f"{reward_endpoint.url}/score", content=b"{nope", timeout=60,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400
    models = httpx.get(f"{reward_endpoint.url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert models.json()["data"][0]["id"] == NAME
    # Every error in OpenAI's shape; a body over deploy.max_body_bytes is refused before it is read whole.
    unknown = _post(reward_endpoint, {"model": "other", "input": ["x"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] and "other" in unknown.json()["error"]["message"]
    from rayapp.config.base import DeployConfig

    limit = DeployConfig().max_body_bytes
    huge = _post(reward_endpoint, {"input": ["x" * (limit + 1)]})
    assert huge.status_code == 413 and "deploy.max_body_bytes" in huge.json()["error"]["message"], huge.text
