"""`deploy.enabled: true` after training: the result is served and still answers after `rayapp run`
has exited (sft: a full model; reward model: `/score`); then `rayapp deploy BASE --adapter A=DIR
--adapter B=DIR` serves two LoRA adapters on one base (a dpo job's, exported alone, and one made with
peft), `rayapp deploy --status` lists what runs, and `rayapp deploy --shutdown` removes it all and stops the
local head rayapp started.

Everything shares one persistent local head (a record file private to this test). The sft job
starts while one CPU burner per core keeps the machine busy, until its Train worker group is up and
has recorded itself in workers.json (issue 18: jobs on the persistent head survive a busy machine;
the in-process cluster gets the same waits: tests/unit/test_runtime_resources.py). The waits a busy
machine strains (runtime.BUSY_MACHINE_TIMEOUTS: the head's raylet and agent start, the worker
group's start while workers import torch, the raylets' health checks) fall in that stretch: 5 minutes
on 2 cores under the burners, under a minute without them. Burning on until the model was exported
took 4 more minutes, the longest part of the suite, and strained none of those waits. The sft
endpoint and the reward model stay up, so the head
lives through the test; three engines are up at its end.

Not here, to keep the suite within CI's time: a distill job's adapter-only export (every kind exports
through rayapp.training.outputs.export_model, dpo's here), a job's own deploy of an adapter-only output (the
CLI deployment below, with the base read from config.resolved.yaml:
tests/integration/test_serving_config.py::test_resolve_source_job_output_dirs), an rlhf job's deploy
(its export is the sft export, checked by tests/integration/test_rlhf.py; the deploy after it is this
same path) and jobs/deploy_reward_tiny.yaml served a second time (its config:
tests/integration/test_serving_config.py; the reward endpoint: tests/integration/test_serving_reward.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl
from tests.conftest import CpuBurners, free_port, make_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # 3 jobs, 3 vLLM engine starts
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]
KEY = "e2e-secret-key"
SHORT = ("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2")


def test_every_training_kind_serves_its_result_and_adapters_share_a_base(tmp_path, tiny_model_dir):
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

    def run(job: str, name: str, *overrides: str, burn_until_started: bool = False) -> str:
        """`rayapp run` with deploy.enabled; returns the endpoint it printed, once the command has exited.
        With burn_until_started, one CPU burner per core runs from the start until the job's Train
        worker group has started (workers.json); the rest of the job and the engine run on a quiet
        machine, to keep the suite short."""
        args = [*RAYAPP, "run", job, f"output_dir={tmp_path / name}", f"name={name}", "deploy.enabled=true", f"deploy.port={port}",
                f"deploy.route_prefix=/{name}", "deploy.max_model_len=256", *overrides]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        if burn_until_started:
            with CpuBurners() as burners:
                deadline = time.monotonic() + 1500
                while proc.poll() is None and not (tmp_path / name / "workers.json").exists():
                    assert time.monotonic() < deadline, "the Train worker group did not start in 1500 s"
                    time.sleep(1)
                assert burners.all_alive(), "a burner stopped before the job ended"
        out, err = proc.communicate(timeout=1500)
        p = subprocess.CompletedProcess(args, proc.returncode, out, err)
        assert p.returncode == 0, " ".join(args) + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
        assert KEY not in p.stdout + p.stderr  # the key is never logged
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

    try:
        url = run("jobs/sft_tiny.yaml", "sft", "deploy.api_key_env=E2E_KEY", "train.max_steps=8", "train.eval_every=4",
                  "train.checkpoint_every=4", burn_until_started=True)
        steps = [r["step"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
        assert steps == list(range(1, 9)), steps
        answers(url, "sft", KEY)
        with pytest.raises(AuthenticationError):
            client(url, "wrong-key").models.list()

        url = run("jobs/reward_model.yaml", "rm", *SHORT)
        scored = httpx.post(f"{url}/score", json={"model": "rm", "input": ["2+3=5", "2+3=7"]}, timeout=120)
        assert scored.status_code == 200 and len(scored.json()["data"]) == 2, scored.text

        # Two LoRA adapters on the same base (tiny), neither deployed by a job: dpo's, exported alone by
        # its job (adapter/, no merged model/), and one made here with peft; both go on one deployment
        # through the CLI, beside the base. (A job's own deploy of an adapter-only output is this
        # deployment with the base read from config.resolved.yaml:
        # tests/integration/test_serving_config.py::test_resolve_source_job_output_dirs.)
        rayapp("run", "jobs/dpo.yaml", f"output_dir={tmp_path / 'dpo'}", "adapter.rank=4", "adapter.export=adapter", *SHORT,
               timeout=1500)
        assert not (tmp_path / "dpo" / "model").exists() and (tmp_path / "dpo" / "adapter" / "adapter_config.json").exists()
        make_adapter(tiny_model_dir, tmp_path / "other")
        p = rayapp("deploy", "tiny", "--adapter", f"dpo={tmp_path / 'dpo' / 'adapter'}",
                   "--adapter", f"other={tmp_path / 'other'}", "--port", str(port), "--max-model-len", "256",
                   timeout=900)
        url = f"http://127.0.0.1:{port}/v1"
        assert f"serving model 'tiny' at {url}" in p.stdout and "adapter 'dpo'" in p.stdout and "adapter 'other'" in p.stdout
        c = client(url)
        assert sorted(m.id for m in c.models.list().data) == ["dpo", "other", "tiny"]
        # Each name really selects its weights: the same prompt's first-token log-prob differs between
        # the base and each adapter (and between the adapters). Were a name routed to the base, two would match.
        first = {}
        for name in ("tiny", "dpo", "other"):
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
