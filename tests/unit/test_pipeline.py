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
