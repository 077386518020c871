"""`rayapp jobs status` progress: step/total, last loss and pipeline stage, from fake output dirs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rayapp.jobs import configured_output_dir, job_progress_lines
from rayapp.progress import read_progress, total_steps


def job_dir(path: Path, config: dict, rows: list[dict], examples: int | None = None, partial: str = "",
            finished: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + partial)
    if examples is not None:
        (path / "data_stats.json").write_text(json.dumps({"train": {"rows": examples + 3, "examples": examples}}))
    if finished:
        (path / "eval.json").write_text("{}")
    return path


def sft(epochs=2.0, batch=8, max_steps=None) -> dict:
    return {"kind": "sft", "name": "s", "train": {"epochs": epochs, "global_batch_size": batch, "max_steps": max_steps}}


def rows(n: int, batch: int = 8, examples: int = 20) -> list[dict]:
    return [{"step": s, "epoch": round(s * batch / examples, 4), "loss": 2.0 / s, "lr": 1e-4} for s in range(1, n + 1)]


def test_training_job_step_total_and_loss(tmp_path):
    d = job_dir(tmp_path / "j", sft(), rows(3) + [{"step": 3, "loss": 0.5, "val_loss": 0.75, "epoch": 1.2}],
                examples=20, partial='{"step": 4, "lo')
    assert read_progress(d).lines() == ["progress: step 3/5, loss 0.5, val_loss 0.75"]  # ceil(2 * 20 / 8)


def test_total_follows_the_loops_formula():
    from rayapp.config.base import TrainConfig
    from rayapp.training.loop import total_steps_for

    for epochs, batch, n in [(1.0, 16, 100), (2.0, 8, 20), (0.5, 4, 7), (3.0, 32, 1000), (1.0, 8, 3)]:
        expected = total_steps_for(TrainConfig(epochs=epochs, global_batch_size=batch, micro_batch_size=1), n)
        row = {"step": 1, "epoch": round(batch / n, 4)}
        cfg = sft(epochs, batch)
        assert total_steps(row, cfg, {"train": {"examples": n}}) == (expected, False)
        estimate, estimated = total_steps(row | {"step": expected, "epoch": round(expected * batch / n, 4)}, cfg, None)
        assert estimated and abs(estimate - expected) <= 1, (epochs, batch, n, estimate, expected)


def test_total_sources(tmp_path):
    assert read_progress(job_dir(tmp_path / "a", sft(max_steps=40), rows(2), examples=20)).step.total == 40
    recorded = job_dir(tmp_path / "b", sft(), [{"step": 2, "loss": 1.0, "total_steps": 12}], examples=20)
    assert read_progress(recorded).step.total == 12
    no_stats = job_dir(tmp_path / "c", sft(epochs=1.0, batch=16), rows(3, batch=16, examples=100))
    assert read_progress(no_stats).lines() == ["progress: step 3/~7, loss 0.6667"]  # ceil(100 / 16), from the epoch column
    rl = job_dir(tmp_path / "d", {"kind": "rlhf", "rl": {"iterations": 20}, "train": {"max_steps": None}},
                 [{"step": 7, "reward_mean": 0.25, "policy_loss": -0.01}])
    assert read_progress(rl).lines() == ["progress: step 7/20, reward_mean 0.25, policy_loss -0.01"]
    done = job_dir(tmp_path / "e", sft(max_steps=3), rows(3), finished=True)
    assert read_progress(done).lines() == ["progress: step 3/3, loss 0.6667, finished"]
    assert read_progress(tmp_path / "nothing").lines() == ["progress: no metrics yet"]


def pipeline(tmp_path: Path) -> dict:
    return {"kind": "pipeline", "name": "p", "output_dir": str(tmp_path / "p"), "stages": {
        "data": {"kind": "dataset"},
        "teacher": {"kind": "sft", "train": {"max_steps": 4}},
        "student": {"kind": "distill", "output_dir": str(tmp_path / "elsewhere")},
    }}


def test_pipeline_current_stage(tmp_path):
    cfg = pipeline(tmp_path)
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / "data" / ".stage.json").write_text('{"status": "succeeded"}')
    job_dir(root / "teacher", sft(max_steps=4), rows(2))
    p = read_progress(root, cfg)
    assert p.lines() == ["progress: stage 2/3: teacher (sft): step 2/4, loss 1",
                         "stages: data succeeded, teacher running, student pending"]
    # The teacher finished; the student (in its own output_dir) has started but logged nothing.
    (root / "teacher" / ".stage.json").write_text('{"status": "succeeded"}')
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.resolved.yaml").write_text("kind: distill\n")
    assert read_progress(root, cfg).lines() == [
        "progress: stage 3/3: student (distill): no metrics yet",
        "stages: data succeeded, teacher succeeded, student running"]


def test_pipeline_failed_and_finished_from_pipeline_json(tmp_path):
    root = tmp_path / "p"
    job_dir(root / "teacher", sft(max_steps=4), rows(2))
    (root / "pipeline.json").write_text(json.dumps({"name": "p", "stages": {
        "data": {"kind": "dataset", "status": "skipped"}, "teacher": {"kind": "sft", "status": "failed"}}}))
    # No config given and no config.resolved.yaml in the pipeline's dir: pipeline.json names the stages.
    assert read_progress(root).lines() == ["progress: stage 2/2: teacher (sft) FAILED: step 2/4, loss 1",
                                           "stages: data skipped, teacher failed"]
    (root / "pipeline.json").write_text(json.dumps({"name": "p", "stages": {
        "data": {"kind": "dataset", "status": "skipped"}, "teacher": {"kind": "sft", "status": "succeeded"}}}))
    assert read_progress(root).lines() == ["progress: stages: 2/2 done", "stages: data skipped, teacher succeeded"]


def test_output_dir_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "cache"))
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="runs/j/config.resolved.yaml", Body=yaml.safe_dump(sft(max_steps=9)).encode())
    s3.put_object(Bucket=s3_bucket, Key="runs/j/metrics.jsonl", Body=b'{"step": 4, "loss": 0.125}\n')
    assert read_progress(f"s3://{s3_bucket}/runs/j").lines() == ["progress: step 4/9, loss 0.125"]


def info(status="RUNNING", **meta) -> SimpleNamespace:
    return SimpleNamespace(status=status, metadata=meta,
                           entrypoint="python -m rayapp.cli run jobs/x.yaml train.max_steps=9")


def test_status_lines_for_a_submitted_job(tmp_path):
    out = job_dir(tmp_path / "out", sft(max_steps=9), rows(2))
    assert job_progress_lines(info(rayapp_output_dir=str(out))) == ["progress: step 2/9, loss 1"]
    assert job_progress_lines(info(rayapp_output_dir="outputs/x")) == [
        "progress: not readable from here: output_dir 'outputs/x' is relative, so the job writes it inside its "
        "working directory on the cluster; submit with an absolute shared path or an s3:// URI"]
    gone = tmp_path / "on-the-cluster"
    assert job_progress_lines(info(rayapp_output_dir=str(gone))) == [
        f"progress: not readable from here: {gone} does not exist on this machine (it is on the cluster's nodes; "
        "run `rayapp jobs status` where that path is mounted)"]
    assert job_progress_lines(info("PENDING", rayapp_output_dir=str(gone))) == ["progress: not started"]
    assert job_progress_lines(info(rayapp_job_file="jobs/x.yaml"), working_dir=str(tmp_path)) == [
        f"progress: unknown here (jobs/x.yaml is not in {tmp_path}; run this from the project directory it was "
        "submitted from)"]


def test_status_finds_output_dir_from_the_job_file_and_overrides(tmp_path):
    """A job submitted with --skip-local-check (or before output_dir was recorded): its job file
    and the entrypoint's overrides give the output_dir."""
    out = job_dir(tmp_path / "run", sft(max_steps=9), rows(5))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "x.yaml").write_text(f"kind: sft\noutput_dir: {out}\ntrain: {{max_steps: 3}}\n")
    lines = job_progress_lines(info(rayapp_job_file="jobs/x.yaml"), working_dir=str(tmp_path))
    assert lines == ["progress: step 5/9, loss 0.4"]  # the resolved config the job wrote says max_steps 9


@pytest.mark.parametrize("text, overrides, expected", [
    ("kind: sft\noutput_dir: /shared/runs/a\n", [], "/shared/runs/a"),
    ("kind: sft\noutput_dir: /shared/runs/a\n", ["output_dir=s3://b/r"], "s3://b/r"),
    ("kind: sft\n", [], "outputs/sft"),  # the kind's default, relative
    ("kind: sft\noutput_dir: runs/a\n", [], "runs/a"),
])
def test_configured_output_dir_is_as_written(tmp_path, text, overrides, expected):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert configured_output_dir(job, overrides) == expected


def test_status_and_hub_modules_import_light():
    """`rayapp jobs status` and model-reference parsing start no heavy library."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys, rayapp.progress, rayapp.jobs, rayapp.models.hub\n"
        "heavy = {'ray', 'torch', 'transformers', 'vllm', 'huggingface_hub', 'pyarrow', 'mlflow', 'wandb'}\n"
        "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "heavy: []" in r.stdout, r.stdout + r.stderr
