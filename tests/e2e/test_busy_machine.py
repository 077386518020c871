"""A training job succeeds on a machine whose cores are all busy with something else.

Ray's health checks and start-up waits are tuned for idle machines (rayapp lengthens the ones it
relies on: rayapp.runtime.BUSY_MACHINE_TIMEOUTS). Here one CPU burner per core runs for the whole
job while `rayapp run` trains with 2 Ray Train workers on its in-process cluster, checkpoints,
evaluates and exports. The same on rayapp's persistent local head: the sft job of
tests/e2e/test_deploy_training_kinds.py trains under burners too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl
from tests.conftest import CpuBurners

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]


def test_training_succeeds_while_every_core_is_busy(tmp_path):
    from rayapp.runtime import BUSY_MACHINE_TIMEOUTS

    with CpuBurners() as burners:
        out = tmp_path / "out"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in BUSY_MACHINE_TIMEOUTS}
        p = subprocess.run([sys.executable, "-m", "rayapp.cli", "run", "jobs/sft_tiny.yaml", f"output_dir={out}",
                            "train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=1100)
        assert burners.all_alive(), "a burner stopped before the job ended"
        burned = burners.cpu_seconds()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9)) and (out / "model" / "config.json").exists()
    # The burners really competed for the cores during the job (each got a real share of a core).
    job_wall = float(p.stdout.rsplit("wall_time_s:", 1)[1].split()[0])
    assert min(burned) > 0.2 * job_wall, (burned, job_wall)
