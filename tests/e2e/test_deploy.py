"""`rayapp run jobs/sft_tiny.yaml deploy.enabled=true` tunes, then serves; the endpoint outlives the command.

Then `rayapp deploy --status` shows it and `rayapp deploy --shutdown` removes it and stops the
local head rayapp started (recorded in a file private to this test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]  # train + engine start: >15 min on a loaded 2-core machine
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]


def test_sft_then_deploy_answers_and_shuts_down(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp_path / "local_cluster.json")
    env["E2E_KEY"] = "e2e-secret-key"
    port = free_port()
    out = tmp_path / "sft"
    try:
        p = subprocess.run(
            [*RAYAPP, "run", "jobs/sft_tiny.yaml", f"output_dir={out}", "deploy.enabled=true", f"deploy.port={port}",
             "deploy.max_model_len=256", "deploy.api_key_env=E2E_KEY"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        url = f"http://127.0.0.1:{port}/v1"
        assert url in p.stdout and "sft_tiny" in p.stdout
        assert "e2e-secret-key" not in p.stdout + p.stderr  # the key is never logged

        # The command has exited; the endpoint still answers.
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="e2e-secret-key", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["sft_tiny"]
        chat = client.chat.completions.create(model="sft_tiny", messages=[{"role": "user", "content": "2+3="}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")

        status = subprocess.run([*RAYAPP, "deploy", "--status"], capture_output=True, text=True, cwd=ROOT, env=env,
                                timeout=300)
        assert status.returncode == 0, status.stderr
        assert "sft_tiny" in status.stdout and "RUNNING" in status.stdout and url in status.stdout
    finally:
        down = subprocess.run([*RAYAPP, "deploy", "--shutdown"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=300)
    assert down.returncode == 0, down.stderr
    assert "sft_tiny" in down.stdout and "local Ray head" in down.stdout
    assert not (tmp_path / "local_cluster.json").exists()
