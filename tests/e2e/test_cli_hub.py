"""`rayapp validate` and `rayapp plan` with a Hub model id, offline, from a Hugging Face cache under
$HF_HOME (huggingface_hub's own variable, read by a fresh process) holding the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_models_hub import COMMIT_MAIN, add_snapshot

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]


def test_validate_and_plan_a_hub_id_offline(tmp_path, tiny_model_dir):
    home = tmp_path / "hf-home"
    add_snapshot(home / "hub", "acme/tiny-chat", COMMIT_MAIN, {p.name: p for p in tiny_model_dir.iterdir() if p.is_file()})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYAPP_HF_CACHE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")

    p = subprocess.run([*RAYAPP, "validate", "jobs/sft_tiny.yaml", "model.path=acme/tiny-chat"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "config ok" in p.stdout and "supervised tokens" in p.stdout

    p = subprocess.run([*RAYAPP, "plan", "jobs/sft_tiny.yaml", "model.path=acme/tiny-chat@main"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr

    p = subprocess.run([*RAYAPP, "validate", "jobs/sft_tiny.yaml", "model.path=acme/elsewhere"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 1
    assert p.stderr.startswith("error: model.path 'acme/elsewhere': no such directory"), p.stderr
    assert f"not in the local cache {home / 'hub'}" in p.stderr and "hf download acme/elsewhere" in p.stderr
    assert "Traceback" not in p.stderr
