"""The rayapp command in a subprocess: validate and run the SFT example job, kill and resume."""

from __future__ import annotations

import json
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


def test_run_sft_tiny_writes_every_output(tmp_path, monkeypatch):
    """Every output, and every metrics.jsonl series in each experiment tracker the job names,
    read back with the tracker's own reader (MLflow and W&B write into output_dir here)."""
    from tests.unit.test_tracking import mlflow_run, tensorboard_scalars, wandb_runs

    out = tmp_path / "out"
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    p = subprocess.run(
        [*RAYAPP, "run", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=6", "train.eval_every=3",
         "report_to=[tensorboard, mlflow, wandb]"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("config.resolved.yaml", "metrics.jsonl", "checkpoints", "model/config.json", "model/model.safetensors", "eval.json", "report.html"):
        assert (out / name).exists(), name
    assert "report:" in p.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r and r["step"] > 0]
    assert [s for s, _ in losses] == list(range(1, 7)) and vals
    scalars, config_text = tensorboard_scalars(out)
    assert [s for s, _ in scalars["loss"]] == [s for s, _ in losses]
    assert [v for _, v in scalars["loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert "learning_rate" in config_text
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as rayapp sets it for its file store
    run, client = mlflow_run(out)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [s for s, _ in vals]
    assert [m.value for m in history] == pytest.approx([v for _, v in vals], rel=1e-6)
    assert run.data.params["train.max_steps"] == "6" and run.info.status == "FINISHED"
    assert {"report.html", "eval.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    (wandb,) = wandb_runs(out)
    assert [h["loss"] for h in wandb["history"] if "loss" in h] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert wandb["exit_code"] == 0


def _registered(snapshot) -> list[str]:
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_job_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    args = [*RAYAPP, "run", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=40", "train.checkpoint_every=4", "train.eval_every=100"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Kill once Ray Train has registered a checkpoint: a step_* directory alone may be an
        # upload the controller never recorded, which a resumed run rightly does not trust.
        snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 600
        while time.time() < deadline and not _registered(snapshot):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        assert _registered(snapshot), "no checkpoint was registered"
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
