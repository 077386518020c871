"""Pipeline mechanics: ${stages.X.output_dir}, validation up front, skip-when-unchanged, failure.

The stage recipes are replaced by a recording fake: what is tested here is the pipeline
around them (the real recipes run in the e2e demo test)."""

from __future__ import annotations

import json
import types

import pytest

from rayapp.config import ConfigError, load_job


def _job(tmp_path, extra_stage: str = "") -> str:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text('{"input_text": "a", "output_text": "b"}\n')
    text = f"""
kind: pipeline
name: p
output_dir: {tmp_path}/out
stages:
  teacher:
    kind: sft
    data: {{train: {data}}}
  student:
    kind: sft
    model: {{path: "${{stages.teacher.output_dir}}/model"}}
    data: {{train: {data}}}
{extra_stage}
"""
    p = tmp_path / "pipe.yaml"
    p.write_text(text)
    return str(p)


@pytest.fixture()
def fake_recipes(monkeypatch):
    calls: list[str] = []
    fail = set()

    def run(cfg):
        calls.append(cfg.name)
        if cfg.name in fail:
            raise RuntimeError("boom")
        from pathlib import Path

        Path(cfg.output_dir, "model").mkdir(parents=True, exist_ok=True)
        return {"model_path": cfg.model.path}

    fake = types.SimpleNamespace(run=run, validate=lambda cfg: "")
    import rayapp.kinds as kinds

    monkeypatch.setattr(kinds, "recipe", lambda kind: fake)
    return calls, fail


def test_stage_outputs_are_substituted_and_validated_up_front(tmp_path):
    cfg = load_job(_job(tmp_path))
    assert cfg.resolved_stage("student")["model"]["path"] == f"{tmp_path}/out/teacher/model"
    assert cfg.dependencies("student") == ["teacher"]
    bad = _job(tmp_path, "  late:\n    kind: sft\n    train: {epochz: 1}\n")
    with pytest.raises(ConfigError, match=r"stages.late: train.epochz: unknown field"):
        load_job(bad)
    fwd = tmp_path / "fwd.yaml"
    fwd.write_text(f"kind: pipeline\noutput_dir: {tmp_path}/o\nstages:\n  a: {{kind: sft, model: {{path: '${{stages.b.output_dir}}'}}}}\n  b: {{kind: sft}}\n")
    with pytest.raises(ConfigError, match="runs later"):
        load_job(fwd)


def test_rerun_skips_unchanged_and_reruns_downstream_of_a_change(tmp_path, fake_recipes):
    from rayapp.pipeline import run

    calls, _ = fake_recipes
    run(load_job(_job(tmp_path)))
    assert calls == ["teacher", "student"]
    run(load_job(_job(tmp_path)))
    assert calls == ["teacher", "student"]  # both skipped
    (tmp_path / "train.jsonl").write_text('{"input_text": "a", "output_text": "c"}\n')  # an input changed
    run(load_job(_job(tmp_path)))
    assert calls[2:] == ["teacher", "student"]
    run(load_job(_job(tmp_path), ["stages.student.train.epochs=2"]))  # only the student changed
    assert calls[4:] == ["student"]
    summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert summary["stages"]["teacher"]["status"] == "skipped"


def test_failed_stage_stops_and_keeps_finished_outputs(tmp_path, fake_recipes):
    from rayapp.pipeline import StageFailed, run

    calls, fail = fake_recipes
    fail.add("student")
    with pytest.raises(StageFailed, match="stage 'student' \\(sft\\) failed.*boom"):
        run(load_job(_job(tmp_path)))
    assert (tmp_path / "out" / "teacher" / ".stage.json").exists()
    fail.clear()
    run(load_job(_job(tmp_path)))
    assert calls == ["teacher", "student", "student"]  # teacher was not re-run


def test_a_changed_stage_starts_over_and_a_failed_one_resumes(tmp_path, monkeypatch, capsys):
    """A stage re-run because its config changed must not resume from checkpoints its earlier
    config wrote (another model: DCP fails on missing keys; same shapes: silently wrong); one re-run
    with the same config after a failure resumes from them."""
    import types
    from pathlib import Path

    import rayapp.kinds as kinds
    from rayapp.pipeline import StageFailed, run

    seen, fail = [], set()

    def recipe_run(cfg):
        ckpts = Path(cfg.output_dir, "checkpoints")
        seen.append((cfg.name, sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []))
        (ckpts / f"step_{len(seen)}").mkdir(parents=True, exist_ok=True)
        if cfg.name in fail:
            raise RuntimeError("killed")
        Path(cfg.output_dir, "model").mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(kinds, "recipe", lambda kind: types.SimpleNamespace(run=recipe_run, validate=lambda cfg: ""))
    fail.add("student")
    with pytest.raises(StageFailed):
        run(load_job(_job(tmp_path)))
    fail.clear()
    run(load_job(_job(tmp_path)))                       # same config: resumes from the failed run's checkpoint
    assert seen[-1] == ("student", ["step_2"])
    out = tmp_path / "out" / "student"
    run(load_job(_job(tmp_path), ["stages.student.train.epochs=2"]))   # changed: starts over
    assert seen[-1] == ("student", [])
    assert sorted(p.name for p in (out / "checkpoints.superseded").iterdir()) == ["step_2", "step_3"]
    assert "config or inputs changed since its checkpoints were written: starting over" in capsys.readouterr().out


def _ask_job(tmp_path, ask: str) -> str:
    p = tmp_path / "ask.yaml"
    p.write_text(f"kind: pipeline\noutput_dir: {tmp_path}/o\nstages:\n"
                 f"  data: {{kind: dataset, sizes: {{train: 4, unlabeled: 0, test: 4}}}}\n"
                 f"  serve: {{kind: deploy, model: tiny}}\n"
                 f"ask: {ask}\n")
    return str(p)


def test_ask_takes_a_question_or_a_held_out_file_row(tmp_path):
    cfg = load_job(_ask_job(tmp_path, "{stage: serve, from_file: '${stages.data.output_dir}/test.jsonl', row: 2, task_type: number}"))
    assert cfg.ask_file() == f"{tmp_path}/o/data/test.jsonl"
    with pytest.raises(ConfigError, match="exactly one of question and from_file"):
        load_job(_ask_job(tmp_path, "{stage: serve}"))
    with pytest.raises(ConfigError, match="no stage 'dta'"):
        load_job(_ask_job(tmp_path, "{stage: serve, from_file: '${stages.dta.output_dir}/test.jsonl'}"))


@pytest.mark.parametrize("served, right", [("12", True), ("-1", False)])
def test_ask_from_a_held_out_file_prints_the_gold_answer_and_checks_it(tmp_path, capsys, served, right):
    """The served model is asked the file's row over plain HTTP; its answer is printed beside the
    gold one and scored with the task's matcher."""
    import http.server
    import threading

    from rayapp.config.pipeline import AskConfig
    from rayapp.pipeline import ask_deployed

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"choices": [{"message": {"content": f" {served}\n"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)  # any free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        held_out = tmp_path / "test.jsonl"
        held_out.write_text('{"input_text": "What is 1 + 1?", "output_text": "2"}\n'
                            '{"input_text": "What is 9 + 3?", "output_text": "12"}\n')
        ask = AskConfig(stage="serve", from_file=str(held_out), row=1, task_type="number", prefix="predict: ")
        url = f"http://127.0.0.1:{server.server_port}/v1"
        result = ask_deployed(ask, {"deploy_url": url, "deploy_model_name": "m"}, str(held_out))
    finally:
        server.shutdown()
    assert seen[0]["messages"] == [{"role": "user", "content": "predict: What is 9 + 3?"}]
    assert (result["question"], result["answer"], result["gold"], result["correct"]) == ("What is 9 + 3?", served, "12", right)
    out = capsys.readouterr().out
    assert f"A: {served}    gold: 12    {'right' if right else 'WRONG'}" in out


def test_ask_is_left_out_when_its_stage_is_not_selected(tmp_path, fake_recipes, capsys, monkeypatch):
    from rayapp.pipeline import run

    # A pipeline with a deploy stage starts the persistent local head unless RAY_ADDRESS names a
    # cluster; the fake recipes need none, and no head may outlive the test.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")

    job = _job(tmp_path, "  serve:\n    kind: deploy\n    model: \"${stages.student.output_dir}/model\"\n")
    with open(job, "a") as f:
        f.write("ask: {stage: serve, question: 'What is 1 + 1?'}\n")
    run(load_job(job, ["only=[teacher]"]))
    assert "stage 'serve' was not selected" in capsys.readouterr().out


def test_prose_with_a_slash_is_not_taken_for_an_input_file(tmp_path):
    """A stage field of free text (evaluate's claims[].otherwise) may contain '/' and be longer than
    a file name may be: the fingerprint must not stat it as a path (it used to fail with ENAMETOOLONG)."""
    from rayapp.pipeline import _input_paths

    prose = "the step-by-step student leads; bench/distill_quality.py shows " + "where rationales pay " * 20
    assert _input_paths({"note": prose, "lines": "a/b\nc/d"}, []) == []
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert _input_paths({"data": str(data)}, []) == [data]
