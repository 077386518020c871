"""`rayapp plan` works on every example job, whatever its kind."""

from __future__ import annotations

import pytest

from rayapp import plan as P
from rayapp.config import load_job
from tests.conftest import ROOT

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_plan_every_example_job(job, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in the examples are relative to the project
    cfg = load_job(job)
    plan = P.estimate_plan(cfg, str(job))
    text = P.format_plan(plan)
    assert text.startswith(f"plan for {job}") and "verdict:" in text
    for part in plan.parts:
        assert part.count >= 1 and part.memory.total > 0
        assert part.memory.weights > 0


def test_batch_job_counts_its_autoscaling_pool(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_job(ROOT / "jobs/batch_infer.yaml")
    (part,) = P.estimate_plan(cfg).parts
    assert part.count == max(cfg.concurrency)
    assert part.flops is not None  # the prompt file is here to count
