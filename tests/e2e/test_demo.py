"""The main pipeline (jobs/demo.yaml) end to end: data -> teacher -> rationales -> two students ->
evaluation -> a served student that answers a held-out question over HTTP.

One run of `make demo` as shipped (about 10 minutes on 2 cores) checks both the mechanics — every
stage, the table with its 95% intervals, the claims printed with their verdicts, a quiet console, the
closing question drawn from the held-out set and scored against its gold answer, every stage skipped
on a re-run — and what the demo shows (issue 14's numbers). A shrunk run would check the mechanics
in a third of the time, but the full run is needed for the numbers and does both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
ROOT = Path(__file__).resolve().parents[2]
RAYAPP = [sys.executable, "-m", "rayapp.cli"]
STAGES = ("data", "teacher", "rationales", "student_sbs", "student_std", "evaluate", "serve")
SKIPPED = "done before with the same inputs, skipped"

def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAYAPP_LOCAL_CLUSTER_FILE"] = str(tmp_path / "local_cluster.json")  # its own persistent head
    return env


def _held_out(out: Path, row: int) -> dict:
    return json.loads((out / "data" / "test.jsonl").read_text().splitlines()[row])


def _check_run(p, out: Path, port: int) -> tuple[dict, dict]:
    """What every demo run shows, whatever its size. Returns (eval.json, pipeline.json)."""
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for stage in STAGES:
        assert (out / stage / ".stage.json").exists(), stage
    summary = json.loads((out / "pipeline.json").read_text())
    assert all(s["status"] == "succeeded" for s in summary["stages"].values())
    evaluation = json.loads((out / "evaluate" / "eval.json").read_text())
    for r in evaluation["results"]:
        lo, hi = r["ci95"]
        assert lo <= r["accuracy"] <= hi and r["n"] > 0
    assert "95% interval" in p.stdout and "claim" in p.stdout
    # A quiet console (issue 21): rayapp's own lines on the terminal, everything else in the log.
    shown = (p.stdout + p.stderr).splitlines()
    # ~60 lines; progress lines come every third of a stage and also on a timer, so a loaded machine prints a few more
    assert len(shown) <= 70, "\n".join(shown)
    log = (out / "logs" / "console.log").read_text()
    assert "(RayTrainWorker pid=" in log and len(log.splitlines()) > len(shown)
    for c in evaluation["claims"]:  # printed with the verdict the numbers give
        assert c["claim"] in p.stdout
        if c["holds"] is False and c["otherwise"]:
            assert c["otherwise"].splitlines()[0].strip() in p.stdout
    best = max((r for r in evaluation["results"] if r["name"] in ("sbs", "std", "student step-by-step", "student standard FT")),
               key=lambda r: r["accuracy"])
    assert evaluation["best"] == best["name"] and (out / "evaluate" / "best_model" / "config.json").exists()
    assert (out / "evaluate" / "report.html").exists()
    # The closing question is the held-out set's first row, answered over HTTP by the served student
    # and printed beside its gold answer.
    ask = summary["ask"]
    first = _held_out(out, 0)
    assert (ask["question"], ask["gold"]) == (first["input_text"], first["output_text"])
    assert f"127.0.0.1:{port}" in ask["endpoint"]
    assert ask["answer"].strip(), "the served student answered nothing"
    assert isinstance(ask["correct"], bool) and f"gold: {first['output_text']}    {'right' if ask['correct'] else 'WRONG'}" in p.stdout
    return evaluation, summary


def _check_rerun_skips_everything(args, env, out: Path) -> None:
    p2 = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    statuses = {name: s["status"] for name, s in json.loads((out / "pipeline.json").read_text())["stages"].items()}
    assert statuses == dict.fromkeys(STAGES, "skipped"), statuses
    assert p2.stdout.count(SKIPPED) == len(STAGES), p2.stdout[-3000:]


def test_demo_meets_its_numbers(tmp_path):
    """`make demo` as shipped (only its output directory and port moved): the teacher answers at least
    0.7 of >= 300 held-out questions (the few-shot baseline answers the first 100); the best student
    (three of the teacher's four layers, trained on the teacher's labels) reaches 0.8 of the teacher's accuracy
    and is the one served; the step-by-step student beats the few-shot SmolLM2-135M with at most a fifth
    of its prompt tokens and a tenth of its latency; every claim is printed with the verdict the table
    gives, and a claim that does not hold with the demo's explanation; the served student answers the
    closing held-out question right.

    Not asserted, because it does not hold on every run (issue 14, open): the step-by-step student at
    0.8 of the teacher and 0.10 above the standard one. Its answer task is the less stable of the two:
    in one process, seeds 0 / 1, it reached 0.47 / 0.74 where the standard student reached 0.67 / 0.57.
    The CPU's kernels move a run as a seed does: with the teacher's layers 0 and 3 (the demo before)
    one AMD EPYC gave 0.273 vs 0.738, another 0.135 vs 0.242."""
    out, port, env = tmp_path / "demo", free_port(), _env(tmp_path)
    args = [*RAYAPP, "run", "jobs/demo.yaml", f"output_dir={out}", f"stages.serve.deploy.port={port}"]
    try:
        p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=2300)
        evaluation, summary = _check_run(p, out, port)
        acc = {r["name"]: r for r in evaluation["results"]}
        students = ("student step-by-step", "student standard FT")
        assert all(acc[name]["n"] >= 300 for name in ("teacher (tuned)", *students))
        teacher = acc["teacher (tuned)"]["accuracy"]
        assert teacher >= 0.7
        assert evaluation["best"] in students and acc[evaluation["best"]]["accuracy"] >= 0.8 * teacher
        claims = {(c["model"], c["versus"], c["metric"]): c for c in evaluation["claims"]}
        sbs = "student step-by-step"
        for key in ((sbs, "SmolLM2-135M 4-shot", "accuracy"), (sbs, "SmolLM2-135M 4-shot", "prompt_tokens"),
                    (sbs, "SmolLM2-135M 4-shot", "latency")):
            assert claims[key]["holds"] is True, claims[key]
        for key in ((sbs, "teacher (tuned)", "accuracy"), (sbs, "student standard FT", "accuracy")):
            assert claims[key]["holds"] or claims[key]["otherwise"], claims[key]  # printed: _check_run
        assert summary["ask"]["correct"] is True and summary["ask"]["answer"] == summary["ask"]["gold"]
        _check_rerun_skips_everything(args, env, out)
    finally:
        subprocess.run([*RAYAPP, "deploy", "--shutdown"], cwd=ROOT, env=env, capture_output=True, timeout=300)
