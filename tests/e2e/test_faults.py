"""Faults on disk, through the rayapp command in a subprocess: a damaged newest checkpoint, and
an output_dir on a full filesystem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]
SFT = ["jobs/sft_tiny.yaml", "train.checkpoint_every=2", "train.eval_every=100"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYAPP, "run", *SFT, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    p = _run(f"output_dir={out}", "train.max_steps=6")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(d.name for d in ckpts.glob("step_*")) == ["step_000004", "step_000006"]  # keep_checkpoints: 2
    shard = ckpts / "step_000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    t1 = time.time()
    p = _run(f"output_dir={out}", "train.max_steps=8")
    t2 = time.time()
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert f"checkpoint {ckpts / 'step_000006'} is unreadable (shard __0_0.distcp has" in log, log[-4000:]
    assert f"resuming from {ckpts / 'step_000004'}" in log
    assert "resuming from checkpoint at step 4" in p.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))
    # The new step 6 took another name than the damaged one, which Ray Train's snapshot listed: pruning
    # the damaged one (keep_checkpoints: 2) removed its files only, and every checkpoint the snapshot
    # lists is there, as the next re-run requires.
    names = sorted(d.name for d in ckpts.glob("step_*"))
    assert names == ["step_000006_1", "step_000008"], names
    snapshot = json.loads((ckpts / "checkpoint_manager_snapshot.json").read_text())
    assert sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]) == names
    print(f"first run {t1 - t0:.0f} s, resumed run {t2 - t1:.0f} s; checkpoints now {names}")
