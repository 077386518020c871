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


@pytest.fixture()
def tiny_fs(tmp_path):
    """mount(size) puts a tmpfs of that size at tmp_path/full (root in a container); unmounted after."""
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / "full"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


# 2m: the first checkpoint (about 7 MB for the tiny model) does not fit; 8m: it fits, the exported
# model (about 2 MB more) does not.
@pytest.mark.parametrize("size,steps", [("2m", "train.max_steps=4"), ("8m", "train.max_steps=2")])
def test_full_output_dir_fails_clearly_and_leaves_nothing_looking_complete(tiny_fs, size, steps):
    from rayapp.training.checkpoint import checkpoint_problem

    out = tiny_fs(size) / "out"
    t0 = time.time()
    p = _run(f"output_dir={out}", steps, "train.keep_checkpoints=1")
    err = p.stderr
    assert p.returncode == 1, p.stdout[-3000:] + err[-3000:]
    assert f"error: job 'sft_tiny' failed: no space left on device under output_dir {out} (" in err, err[-4000:]
    assert "set output_dir to a filesystem with room" in err
    left = sorted(str(f.relative_to(out)) for f in out.rglob("*"))
    assert not (out / "model").exists() and not [f for f in left if ".tmp-" in f or f.startswith(".model")], left
    for step in (out / "checkpoints").glob("step_*"):
        assert checkpoint_problem(step) is None, (step, left)  # registered ones are complete; the rest was removed
    print(f"{size}: failed after {time.time() - t0:.0f} s; left {left}")
