"""Serving pieces that need no cluster: deploy job files, source resolution, API keys, the auth middleware."""

from __future__ import annotations

import json

import pytest

from rayapp.config import load_job
from rayapp.config.base import DeployConfig
from rayapp.serving.errors import DeployError
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["deploy_tiny.yaml", "deploy_sft_tiny.yaml", "deploy_reward_tiny.yaml"])
def test_deploy_job_files_load(name):
    cfg = load_job(ROOT / "jobs" / name)
    assert cfg.kind == "deploy"
    assert cfg.deploy.host == "127.0.0.1"


def test_deploy_recipe_validates_the_tiny_job(tiny_model_dir):
    from rayapp.kinds import recipe

    cfg = load_job(ROOT / "jobs" / "deploy_tiny.yaml")
    text = recipe("deploy").validate(cfg)
    assert str(tiny_model_dir) in text and "served as: tiny-chat" in text and "API key not required" in text


def test_unknown_field_names_file_and_line(tmp_path):
    from rayapp.config import ConfigError

    job = tmp_path / "d.yaml"
    job.write_text("kind: deploy\nmodel: tiny\ndeploy:\n  replicas: 2\n")
    with pytest.raises(ConfigError) as e:
        load_job(job)
    assert f"{job}:4: deploy.replicas: unknown field" in str(e.value)


def test_resolve_source_job_output_dirs(tmp_path, tiny_model_dir):
    from rayapp.serving.deploy import resolve_source

    # output_dir with model/
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "a" / "model" / "config.json").write_text("{}")
    base, adapters = resolve_source(str(tmp_path / "a"))
    assert base == tmp_path / "a" / "model" and adapters == {}
    # adapter-only output: the base comes from config.resolved.yaml
    (tmp_path / "b" / "adapter").mkdir(parents=True)
    (tmp_path / "b" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(DeployError, match="config.resolved.yaml is missing"):
        resolve_source(str(tmp_path / "b"), name="x")
    (tmp_path / "b" / "config.resolved.yaml").write_text("model: {path: tiny}\n")
    base, adapters = resolve_source(str(tmp_path / "b"), name="sup")
    assert base == tiny_model_dir and adapters == {"sup": str(tmp_path / "b" / "adapter")}
    # a directory that is not an adapter
    with pytest.raises(DeployError, match="has no adapter_config.json"):
        resolve_source("tiny", {"x": str(tmp_path)})


def test_api_key_sources(tmp_path, monkeypatch):
    from rayapp.serving.app import read_api_key

    assert read_api_key(DeployConfig()) is None
    monkeypatch.delenv("RAYAPP_K", raising=False)
    with pytest.raises(DeployError, match="RAYAPP_K is not set"):
        read_api_key(DeployConfig(api_key_env="RAYAPP_K"))
    monkeypatch.setenv("RAYAPP_K", " s3cret \n")
    assert read_api_key(DeployConfig(api_key_env="RAYAPP_K")) == "s3cret"
    key_file = tmp_path / "key"
    with pytest.raises(DeployError, match="does not exist"):
        read_api_key(DeployConfig(api_key_file=str(key_file)))
    key_file.write_text("filekey\n")
    assert read_api_key(DeployConfig(api_key_file=str(key_file))) == "filekey"
    with pytest.raises(DeployError, match="both set"):
        read_api_key(DeployConfig(api_key_env="RAYAPP_K", api_key_file=str(key_file)))


def test_api_key_middleware():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from rayapp.serving.app import APIKeyMiddleware, key_digest

    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": []})
    app.add_middleware(APIKeyMiddleware, key_sha256=key_digest("k1"))
    client = TestClient(app)
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "k1"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert client.get("/v1/models", headers={"authorization": "bearer k1"}).status_code == 200


def test_llm_config_from_deploy_section(tiny_model_dir, tmp_path):
    from rayapp.serving.app import build_llm_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    deploy = DeployConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=8, max_model_len=256)
    cfg = build_llm_config(tiny_model_dir, "m", deploy, {"a": str(tmp_path)})
    auto = cfg.deployment_config["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 3, 8)
    assert cfg.engine_kwargs["max_model_len"] == 256 and cfg.engine_kwargs["dtype"] == "float32"
    assert cfg.engine_kwargs["enable_lora"] and cfg.engine_kwargs["max_lora_rank"] == 8
    assert cfg.accelerator_config.kind == "cpu"
    gpu = build_llm_config(tiny_model_dir, "m", DeployConfig(use_gpu=True, tensor_parallel_size=2))
    assert gpu.accelerator_config.kind == "gpu" and gpu.engine_kwargs["tensor_parallel_size"] == 2


def test_cli_rejects_bad_adapter_flag():
    from rayapp.cli import main

    assert main(["deploy", "tiny", "--adapter", "no-equals-sign"]) == 1


def test_chat_shape_middleware():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from rayapp.serving.app import ChatShapeMiddleware

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        return {"n": len(body["messages"])}

    app.add_middleware(ChatShapeMiddleware)
    client = TestClient(app)
    bad = client.post("/v1/chat/completions", json={"model": "m", "messages": 5})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"messages": ["x"]}).status_code == 400
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json() == {"n": 1}  # the body is replayed to the app intact
