"""`rayapp submit` / `rayapp jobs` against a real Ray head: the persistent local head rayapp starts
(`rayapp.serving.local_head`: loopback only, token auth, free ports, its own temp dir, 8 logical
CPUs), with a record file private to this module. It is torn down by `stop_local_head`, which
signals only that head's processes. Plain `ray stop` is not used: it kills every Ray process of
this user on the machine, including other people's clusters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rayapp.data.readers import read_jsonl
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration


def rayapp(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The rayapp command in a subprocess, run from the project root as a user would (``env``: more
    environment variables)."""
    env = {**os.environ, **(env or {})}
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
    # A relative output_dir is checked and warned about before the cluster is even reached.
    r = rayapp("submit", "jobs/sft_tiny.yaml", "output_dir=outputs/relative_here", "--address",
               f"http://127.0.0.1:{free_port()}", timeout=120)
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr, r.stderr
    assert "warning: output_dir 'outputs/relative_here' is relative: on the cluster it is written inside the job's" in r.stderr
    from rayapp import jobs

    assert is_user_error(jobs.JobsError("x"))


# ---- against the real head ----

def _machine_token() -> str:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").read_text().strip()


def test_submit_follow_succeeds_and_writes_outputs(private_head, tmp_path):
    out = tmp_path / "sft_tiny"
    job_id = f"rayapp-test-{os.getpid()}-{time.time_ns()}"
    # The address from $RAYAPP_JOBS_ADDRESS and the token from $RAY_AUTH_TOKEN (its file path points
    # nowhere), as on a laptop submitting to another cluster; --env and --submission-id as documented.
    r = rayapp("submit", "jobs/sft_tiny.yaml", f"output_dir={out}", "train.epochs=1", "--env", "RAYAPP_TEST_MARK=a=b c",
               "--submission-id", job_id, "--follow",
               env={"RAYAPP_JOBS_ADDRESS": private_head.dashboard, "RAY_AUTH_TOKEN": _machine_token(),
                    "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no_token_here")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[0].strip() == job_id
    assert f"{job_id}: SUCCEEDED" in r.stdout
    from rayapp import jobs

    env_vars = jobs.client(private_head.dashboard).get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars["RAYAPP_TEST_MARK"] == "a=b c" and env_vars["RAYAPP_CONSOLE"] == "full", env_vars
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


def test_unknown_job_id_and_a_wrong_token(private_head, tmp_path):
    r = rayapp("jobs", "status", "raysubmit_nope", "--address", private_head.dashboard)
    assert r.returncode == 1 and "no job 'raysubmit_nope'" in r.stderr
    r = rayapp("jobs", "list", "--address", private_head.dashboard,
               env={"RAY_AUTH_TOKEN": "0" * 64, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no_token_here")})
    assert r.returncode == 1 and "wants an auth token" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- a worker killed after a checkpoint (resources.max_failures) ----

def train_workers_of(head) -> list[psutil.Process]:
    """RayTrainWorker actor processes that belong to this head."""
    found = []
    for pid in head.pids():
        try:
            p = psutil.Process(pid)
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_worker_resumes_from_checkpoint(private_head, tmp_path):
    out = tmp_path / "sft_fail"
    # 32 steps, a checkpoint every 2: the kill lands well before the end.
    overrides = [f"output_dir={out}", "resources.max_failures=1", "train.epochs=2", "train.checkpoint_every=2",
                 "train.eval_every=1000"]
    r = rayapp("submit", "jobs/sft_tiny.yaml", *overrides, "--address", private_head.dashboard)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]

    # Kill only once Ray Train has registered a checkpoint: a directory on disk may still be in flight.
    wait_for(lambda: registered_step(out), 400, f"a registered checkpoint under {out}")
    workers = wait_for(lambda: train_workers_of(private_head), 60, "RayTrainWorker processes")
    killed_after = registered_step(out)
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    from rayapp import jobs

    state = jobs.wait(job_id, private_head.dashboard, timeout_s=900)
    logs = jobs.logs(job_id, private_head.dashboard)
    assert state == "SUCCEEDED", logs[-4000:]
    # Every restarted worker reports the same step (one group restart, one checkpoint).
    resumed_at = {int(chunk.split()[0]) for chunk in logs.split("resuming from checkpoint at step ")[1:]}
    assert len(resumed_at) == 1, logs[-4000:]
    (resumed,) = resumed_at
    assert killed_after <= resumed < 32

    rows = read_jsonl(out / "metrics.jsonl")
    steps = [row["step"] for row in rows if "loss" in row]
    # The step counter continues from the checkpoint: each step once, in order, to the end.
    assert steps == sorted(set(steps)) and steps[-1] == 32 and resumed in steps and resumed + 1 in steps
    assert (out / "model" / "config.json").exists()
