"""`deploy.enabled: true` on every training kind other than sft (tests/e2e/test_deploy.py): the
result is served and still answers after `rayapp run` has exited.

All deployments share one persistent local head (a record file private to this test). The reward
model goes first and stays up, so the head lives through the test while each vLLM deployment
(rlhf; dpo and distill with a LoRA exported as adapter only, served on its base) is checked and
removed before the next job, keeping one engine up at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]  # 4 jobs, 3 vLLM engine starts
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]


def test_training_kinds_serve_their_result_after_run_exits(tmp_path):
    import httpx
    from openai import OpenAI

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp_path / "local_cluster.json")
    port = free_port()

    def run(job: str, name: str, *overrides: str) -> str:
        """`rayapp run` with deploy.enabled; returns the endpoint it printed, once the command has exited."""
        p = subprocess.run(
            [*RAYAPP, "run", job, f"output_dir={tmp_path / name}", f"name={name}", "deploy.enabled=true", f"deploy.port={port}",
             f"deploy.route_prefix=/{name}", "deploy.max_model_len=256", *overrides],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        url = f"http://127.0.0.1:{port}/{name}/v1"
        assert f"endpoint: {url}" in p.stdout and f"served_model: {name}" in p.stdout, p.stdout[-2000:]
        return url

    def answers(url: str, name: str) -> None:
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        assert name in [m.id for m in client.models.list().data]
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "2+3="}], max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")

    def remove(name: str) -> None:
        down = subprocess.run([*RAYAPP, "deploy", "--shutdown", name], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert down.returncode == 0 and name in down.stdout, down.stdout + down.stderr

    try:
        url = run("jobs/reward_model.yaml", "rm", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")
        scored = httpx.post(f"{url}/score", json={"model": "rm", "input": ["2+3=5", "2+3=7"]}, timeout=120)
        assert scored.status_code == 200 and len(scored.json()["data"]) == 2, scored.text

        url = run("jobs/rlhf_grpo.yaml", "rlhf", "rl.iterations=1", "rl.prompts_per_iteration=4", "rl.eval_prompts=0",
                  "train.micro_batch_size=8")
        answers(url, "rlhf")
        remove("rlhf")

        # LoRA exported as adapter/ only (no merged model/): served on the base named in config.resolved.yaml.
        url = run("jobs/dpo.yaml", "dpo", "adapter.rank=4", "adapter.export=adapter", "train.max_steps=2", "train.eval_every=2",
                  "train.checkpoint_every=2")
        assert not (tmp_path / "dpo" / "model").exists() and (tmp_path / "dpo" / "adapter" / "adapter_config.json").exists()
        answers(url, "dpo")
        remove("dpo")

        url = run("jobs/distill_self.yaml", "distill", "teacher.path=tiny", "self.rounds=1", "adapter.rank=4", "adapter.export=adapter",
                  "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")
        assert not (tmp_path / "distill" / "model").exists()
        answers(url, "distill")
    finally:
        down = subprocess.run([*RAYAPP, "deploy", "--shutdown"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert down.returncode == 0, down.stderr
    assert "local Ray head" in down.stdout
    assert not (tmp_path / "local_cluster.json").exists()
