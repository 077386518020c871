"""The rayapp command in a subprocess: validate and run the SFT example job, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_validate_broken_file_exits_nonzero_with_file_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"input_text": "ok", "output_text": "fine"}\n{"input_text": "no output"}\n{not json\n')
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: sft\nmodel: {{path: tiny}}\ndata: {{train: {bad}}}\n")
    p = subprocess.run([*RAYAPP, "validate", str(job)], capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300)
    assert p.returncode != 0
    assert f"{bad}:2: output_text" in p.stderr, p.stderr
    assert f"{bad}:3:" in p.stderr and "JSON" in p.stderr
    assert "Traceback" not in p.stderr

    job.write_text("kind: sft\ntrain:\n  epochz: 1\n")
    p = subprocess.run([*RAYAPP, "validate", str(job)], capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2 and f"{job}:3: train.epochz: unknown field" in p.stderr


def test_validate_prints_dataset_stats():
    p = subprocess.run([*RAYAPP, "validate", "jobs/sft_tiny.yaml"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "config ok" in p.stdout and "examples" in p.stdout


def test_run_sft_tiny_writes_every_output(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [*RAYAPP, "run", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=6"],
        capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("config.resolved.yaml", "metrics.jsonl", "checkpoints", "model/config.json", "model/model.safetensors", "eval.json", "report.html"):
        assert (out / name).exists(), name
    assert "report:" in p.stdout


def test_killed_job_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    args = [*RAYAPP, "run", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=40", "train.checkpoint_every=4", "train.eval_every=100"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(1)
        assert list((out / "checkpoints").glob("step_*")), "no checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Workers of the killed run can outlive its driver for a moment and still register a
    # checkpoint: take the set once it has stopped changing.
    done, stable_since = set(), time.time()
    while time.time() - stable_since < 15:
        now = {int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")}
        if now != done:
            done, stable_since = now, time.time()
        time.sleep(1)
    assert max(done) < 40 and not (out / "model").exists(), f"the kill landed after the run ended: checkpoints {sorted(done)}"
    p = subprocess.run([*args[:-3], "train.max_steps=40", "train.checkpoint_every=4", "train.eval_every=100"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from checkpoint at step" in p.stdout
    resumed = int(p.stdout.split("resuming from checkpoint at step ")[1].split()[0])
    assert resumed in done and resumed >= 4
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 41))
