"""`rayapp submit` / `rayapp jobs` against a real Ray head: the persistent local head rayapp starts
(`rayapp.serving.local_head`: loopback only, token auth, free ports, its own temp dir, 8 logical
CPUs), with a record file private to this module. It is torn down by `stop_local_head`, which
signals only that head's processes. Plain `ray stop` is not used: it kills every Ray process of
this user on the machine, including other people's clusters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration  # the tests against a real head are marked slow one by one


def rayapp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The rayapp command in a subprocess, run from the project root as a user would."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "rayapp.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not seen after {timeout_s} s")


def registered_step(output_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train has registered (a directory on disk may still be in flight)."""
    snap = output_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def checkpoint_steps(output_dir: Path) -> list[int]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if p.is_dir())


# ---- pure parts of the client (no cluster) ----

def test_build_submission_ships_project_and_runs_rayapp():
    from rayapp import jobs

    sub = jobs.build_submission("jobs/sft_tiny.yaml", ["train.epochs=1"], working_dir=str(ROOT))
    assert sub["entrypoint"] == "python -m rayapp.cli run jobs/sft_tiny.yaml train.epochs=1"
    env = sub["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", "outputs/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["RAYAPP_CONSOLE"] == "full"  # the Ray job log keeps everything
    with pytest.raises(jobs.JobsError, match="must lie inside the working directory"):
        jobs.build_submission(str(ROOT / "jobs/sft_tiny.yaml"), working_dir=str(ROOT / "rayapp"))


def test_state_mapping_and_address():
    from ray.job_submission import JobStatus

    from rayapp import jobs

    assert {jobs.map_state(s) for s in JobStatus} == {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"}
    assert jobs.map_state("SOMETHING_NEW") == "UNKNOWN(SOMETHING_NEW)"
    assert jobs.resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"


def test_unreachable_address_is_a_user_error():
    from rayapp.errors import is_user_error

    r = rayapp("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert r.returncode == 1, r.stderr
    assert "cannot reach the Ray Jobs API" in r.stderr and "Traceback" not in r.stderr
    from rayapp import jobs

    assert is_user_error(jobs.JobsError("x"))


# ---- against the real head ----

@pytest.mark.slow
def test_submit_follow_succeeds_and_writes_outputs(private_head, tmp_path):
    out = tmp_path / "sft_tiny"
    r = rayapp("submit", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.epochs=1", "--address", private_head.dashboard,
               "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert f"{job_id}: SUCCEEDED" in r.stdout
    assert (out / "model" / "config.json").exists() and any((out / "model").glob("*.safetensors"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["step"] == 16  # 256 rows, 1 epoch, global batch 16
    assert (out / "config.resolved.yaml").exists()

    listed = rayapp("jobs", "list", "--address", private_head.dashboard)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = rayapp("jobs", "status", job_id, "--address", private_head.dashboard)
    assert f"{job_id}: SUCCEEDED" in status.stdout and "rayapp.cli run jobs/sft_tiny.yaml" in status.stdout
    # How far it got, from the output_dir recorded at submission (readable here: same machine).
    progress = [line for line in status.stdout.splitlines() if line.startswith("progress: ")]
    assert len(progress) == 1 and progress[0].startswith("progress: step 16/16, loss "), status.stdout
    assert progress[0].endswith(", finished"), status.stdout
    logs = rayapp("jobs", "logs", job_id, "--address", private_head.dashboard)
    assert "sft_tiny" in logs.stdout and "output_dir" in logs.stdout


@pytest.mark.slow
def test_stop_leaves_a_usable_checkpoint(private_head, tmp_path):
    out = tmp_path / "sft_stop"
    overrides = [f"output_dir={out}", "train.epochs=6", "train.checkpoint_every=2", "train.eval_every=1000"]
    r = rayapp("submit", "jobs/sft_tiny.yaml", *overrides, "--address", private_head.dashboard)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    wait_for(lambda: registered_step(out), 400, f"a registered checkpoint under {out}")
    stopped = rayapp("jobs", "stop", job_id, "--address", private_head.dashboard)
    assert f"{job_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in rayapp("jobs", "status", job_id, "--address", private_head.dashboard).stdout
    last = registered_step(out)
    assert last < 96  # stopped before the end (6 epochs x 16 steps)
    assert (out / "checkpoints" / f"step_{last:06d}").is_dir()

    # The same job again resumes from the checkpoint the stopped run left behind.
    again = rayapp("submit", "jobs/sft_tiny.yaml", *overrides, f"train.max_steps={last + 2}",
                   "--address", private_head.dashboard, "--follow")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from checkpoint at step {last} " in again.stdout, again.stdout[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][-3:] == [last, last + 1, last + 2]


@pytest.mark.slow
def test_broken_config_fails_with_validation_message(private_head, tmp_path):
    project = tmp_path / "project"  # a project holding only the broken job file; rayapp is installed
    project.mkdir()
    bad = project / "broken.yaml"
    bad.write_text((ROOT / "jobs/sft_tiny.yaml").read_text().replace("epochs: 10", "epochs: -10"))
    # Checked here first: refused before anything is sent.
    local = rayapp("submit", str(bad), "--working-dir", str(project), "--address", private_head.dashboard)
    assert local.returncode == 2 and "train.epochs" in local.stderr, local.stderr
    # Sent unchecked, the job itself refuses it and FAILS with the same message in its logs.
    r = rayapp("submit", str(bad), "--working-dir", str(project), "--skip-local-check",
               "--address", private_head.dashboard, "--follow")
    job_id = r.stdout.splitlines()[0].strip()
    assert r.returncode == 1 and f"{job_id}: FAILED" in r.stdout, r.stdout + r.stderr
    logs = rayapp("jobs", "logs", job_id, "--address", private_head.dashboard).stdout
    assert "broken.yaml:" in logs and "train.epochs" in logs and "greater than 0" in logs, logs


@pytest.mark.slow
def test_unknown_job_id(private_head):
    r = rayapp("jobs", "status", "raysubmit_nope", "--address", private_head.dashboard)
    assert r.returncode == 1 and "no job 'raysubmit_nope'" in r.stderr
