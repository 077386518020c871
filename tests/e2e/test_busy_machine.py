"""A training job succeeds on a machine whose cores are all busy with something else.

Ray's health checks and start-up waits are tuned for idle machines (rayapp lengthens the ones it
relies on: rayapp.runtime.BUSY_MACHINE_TIMEOUTS). Here one CPU burner per core runs for the whole
job, bounded in time and killed at the end, while `rayapp run` trains with 2 Ray Train workers on
its in-process cluster, checkpoints, evaluates and exports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]
BURN = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_training_succeeds_while_every_core_is_busy(tmp_path):
    from rayapp.runtime import BUSY_MACHINE_TIMEOUTS

    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(os.cpu_count() or 1)]
    try:
        out = tmp_path / "out"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in BUSY_MACHINE_TIMEOUTS}
        p = subprocess.run([sys.executable, "-m", "rayapp.cli", "run", "jobs/sft_tiny.yaml", f"output_dir={out}",
                            "train.max_steps=12", "train.checkpoint_every=6", "train.eval_every=6"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=1100)
        assert all(b.poll() is None for b in burners), "a burner stopped before the job ended"
        burned = [_cpu_seconds(b.pid) for b in burners]
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13)) and (out / "model" / "config.json").exists()
    # The burners really competed for the cores during the job (each got a real share of a core).
    job_wall = float(p.stdout.rsplit("wall_time_s:", 1)[1].split()[0])
    assert min(burned) > 0.2 * job_wall, (burned, job_wall)
