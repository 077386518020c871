"""A Ray Train worker killed mid-run (after a checkpoint) is restarted from that checkpoint when
``resources.max_failures: 1``, and the job still succeeds, on a real head started here."""

from __future__ import annotations

import signal

import psutil
import pytest

from rayapp.data.readers import read_jsonl
from tests.integration.test_jobs import rayapp, registered_step, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
