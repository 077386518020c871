"""`deploy.enabled: true` on every training kind: the result is served and still answers after
`rayapp run` has exited; then `rayapp deploy BASE --adapter A=DIR --adapter B=DIR` serves two LoRA
adapters on one base, `rayapp deploy --status` lists what runs, and `rayapp deploy --shutdown`
removes it all and stops the local head rayapp started.

Everything shares one persistent local head (a record file private to this test). The sft job
trains while one CPU burner per core keeps the machine busy (issue 18: jobs on the persistent head
survive a busy machine; tests/e2e/test_busy_machine.py does the same in-process). The sft endpoint
and the reward model stay up, so the head lives through the test, while each other vLLM deployment
is checked and removed before the next, keeping at most two engines up at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CpuBurners, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]  # 5 jobs, 4 vLLM engine starts
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]
KEY = "e2e-secret-key"
SHORT = ("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")


def test_every_training_kind_serves_its_result_and_adapters_share_a_base(tmp_path):
    import httpx
    from openai import AuthenticationError, OpenAI

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp_path / "local_cluster.json")
    env["E2E_KEY"] = KEY
    port = free_port()

    def rayapp(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([*RAYAPP, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        assert p.returncode == 0, " ".join(args) + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
        assert KEY not in p.stdout + p.stderr  # the key is never logged
        return p

    def run(job: str, name: str, *overrides: str) -> str:
        """`rayapp run` with deploy.enabled; returns the endpoint it printed, once the command has exited."""
        p = rayapp("run", job, f"output_dir={tmp_path / name}", f"name={name}", "deploy.enabled=true", f"deploy.port={port}",
                   f"deploy.route_prefix=/{name}", "deploy.max_model_len=256", *overrides, timeout=1500)
        url = f"http://127.0.0.1:{port}/{name}/v1"
        assert f"endpoint: {url}" in p.stdout and f"served_model: {name}" in p.stdout, p.stdout[-2000:]
        return url

    def client(url: str, key: str = "none") -> OpenAI:
        return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)

    def answers(url: str, name: str, key: str = "none") -> None:
        c = client(url, key)
        assert name in [m.id for m in c.models.list().data]
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "2+3="}], max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")

    def remove(name: str) -> None:
        assert name in rayapp("deploy", "--shutdown", name).stdout

    try:
        with CpuBurners() as burners:
            url = run("jobs/sft_tiny.yaml", "sft", "deploy.api_key_env=E2E_KEY", "train.max_steps=8",
                      "train.eval_every=4", "train.checkpoint_every=4")
            assert burners.all_alive(), "a burner stopped before the job ended"
        answers(url, "sft", KEY)
        with pytest.raises(AuthenticationError):
            client(url, "wrong-key").models.list()

        url = run("jobs/reward_model.yaml", "rm", *SHORT)
        scored = httpx.post(f"{url}/score", json={"model": "rm", "input": ["2+3=5", "2+3=7"]}, timeout=120)
        assert scored.status_code == 200 and len(scored.json()["data"]) == 2, scored.text

        url = run("jobs/rlhf_grpo.yaml", "rlhf", "rl.iterations=1", "rl.prompts_per_iteration=4", "rl.eval_prompts=0",
                  "train.micro_batch_size=8")
        answers(url, "rlhf")
        remove("rlhf")

        # LoRA exported as adapter/ only (no merged model/): served on the base named in config.resolved.yaml.
        url = run("jobs/dpo.yaml", "dpo", "adapter.rank=4", "adapter.export=adapter", *SHORT)
        assert not (tmp_path / "dpo" / "model").exists() and (tmp_path / "dpo" / "adapter" / "adapter_config.json").exists()
        answers(url, "dpo")
        remove("dpo")

        # A second adapter on the same base (tiny), not deployed by its job: both go on one deployment
        # through the CLI, beside the base.
        rayapp("run", "jobs/distill_self.yaml", f"output_dir={tmp_path / 'distill'}", "teacher.path=tiny", "self.rounds=1",
               "adapter.rank=4", "adapter.export=adapter", *SHORT, timeout=1500)
        assert not (tmp_path / "distill" / "model").exists()
        p = rayapp("deploy", "tiny", "--adapter", f"dpo={tmp_path / 'dpo' / 'adapter'}",
                   "--adapter", f"distill={tmp_path / 'distill' / 'adapter'}", "--port", str(port), "--max-model-len", "256",
                   timeout=900)
        url = f"http://127.0.0.1:{port}/v1"
        assert f"serving model 'tiny' at {url}" in p.stdout and "adapter 'dpo'" in p.stdout and "adapter 'distill'" in p.stdout
        c = client(url)
        assert sorted(m.id for m in c.models.list().data) == ["distill", "dpo", "tiny"]
        # Each name really selects its weights: the same prompt's first-token log-prob differs between
        # the base and each adapter (and between the adapters). Were a name routed to the base, two would match.
        first = {}
        for name in ("tiny", "dpo", "distill"):
            done = c.completions.create(model=name, prompt="2+3=", max_tokens=1, temperature=0, logprobs=1)
            first[name] = done.choices[0].logprobs.token_logprobs[0]
        assert len({round(v, 6) for v in first.values()}) == 3, first

        status = rayapp("deploy", "--status").stdout
        for name, where in (("sft", f"127.0.0.1:{port}/sft"), ("rm", f"127.0.0.1:{port}/rm"), ("tiny", f"127.0.0.1:{port}")):
            line = next((ln for ln in status.splitlines() if ln.startswith(name + " ")), "")
            assert "RUNNING" in line and where in line, status
    finally:
        down = subprocess.run([*RAYAPP, "deploy", "--shutdown"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert down.returncode == 0, down.stderr
    assert all(name in down.stdout for name in ("sft", "rm", "tiny")) and "local Ray head" in down.stdout, down.stdout
    assert not (tmp_path / "local_cluster.json").exists()
