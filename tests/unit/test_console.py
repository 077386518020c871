"""The quiet console of `rayapp run`: what reaches the terminal, and that everything reaches the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from rayapp import console

ROOT = Path(__file__).resolve().parents[2]


def test_rayapp_lines_are_shown_and_the_rest_is_not():
    console.watch("teacher")
    ray_line = "\x1b[36m(RayTrainWorker pid=21632)\x1b[0m [teacher]   200/800 ▕███░░░▏ loss 0.51"
    assert console.shown(ray_line) == "[teacher]   200/800 ▕███░░░▏ loss 0.51"
    assert console.shown("[teacher] resuming from checkpoint at step 400 (x)") == "[teacher] resuming from checkpoint at step 400 (x)"
    assert console.shown("(RayTrainWorker pid=7, ip=10.0.0.2) WARNING: step_000400 is damaged") == "WARNING: step_000400 is damaged"
    for noise in ("(TrainController pid=1) [2026-12-02 08:04:03,535 E 1 2] core_worker.cc:2465: Actor ...",
                  "[someone_else] 1/2", "INFO 12-02 08:01:04 [engine.py:12] Initializing", "Loading weights: 100%|██| 20/20",
                  "2026-12-02 08:03:04,314\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled"):
        assert console.shown(noise) is None, noise


def test_captured_sends_everything_to_the_log_and_only_rayapp_lines_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "console.log"
    script = textwrap.dedent(f"""
        import subprocess, sys
        from rayapp import console
        console.watch("job")
        with console.captured({str(log)!r}):
            print("library chatter on stdout")
            print("a traceback line on stderr", file=sys.stderr)
            subprocess.run([sys.executable, "-c", "print('(RayTrainWorker pid=3) [job] 5/10 loss 1.0'); print('child noise')"])
            console.say("the table\\nof results")
        print("after the capture")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["[job] 5/10 loss 1.0", "the table", "of results", "after the capture"]
    assert p.stderr == ""
    text = log.read_text()
    for line in ("library chatter on stdout", "a traceback line on stderr", "child noise", "(RayTrainWorker pid=3) [job] 5/10 loss 1.0",
                 "the table"):
        assert line in text, line
    assert "after the capture" not in text


def test_say_is_a_plain_print_outside_a_capture(capsys):
    console.say("hello")
    assert capsys.readouterr().out == "hello\n"


def test_run_summary_puts_a_pipelines_reports_on_one_line():
    from rayapp.cli import _summary_lines

    summary = {"pipeline": "/o/demo/pipeline.json", "wall_time_s": 793.0, "evaluate.table": "a\nb",
               "teacher.report": "/o/demo/teacher/report.html", "evaluate.report": "/o/demo/evaluate/report.html"}
    assert _summary_lines(summary, said=("wall_time_s",)) == ["pipeline: /o/demo/pipeline.json",
                                                             "reports: /o/demo/{teacher,evaluate}/report.html"]
    assert _summary_lines({"output_dir": "x", "report": "x/report.html", "loss": 0.5}) == ["output_dir: x", "report: x/report.html", "loss: 0.5"]
