"""`kind: evaluate` and the matchers agree on task-type names: a yes/no held-out set evaluated
with the config's task_type scores right answers as right (``yes_no`` used to be the only name
evaluate accepted while every matcher knew ``yesno``, so "Yes." never matched "yes")."""

from __future__ import annotations

import typing

import pytest

from rayapp.config.batch import RationalesConfig
from rayapp.config.distill import DistillJobConfig
from rayapp.config.evaluate import EvaluateJobConfig
from rayapp.config.loader import load_job_dict
from rayapp.evaluation import load_eval_rows, score_answers
from rayapp.teachers.templates import TASK_TYPES


def _accepted(model, field: str = "task_type") -> tuple[str, ...]:
    return typing.get_args(model.model_fields[field].annotation)


@pytest.mark.parametrize("model", [EvaluateJobConfig, RationalesConfig, DistillJobConfig])
def test_every_config_takes_the_matchers_task_types(model):
    assert sorted(_accepted(model)) == sorted(TASK_TYPES)


def test_evaluate_scores_a_yes_no_set(tmp_path):
    data = tmp_path / "yesno.jsonl"
    data.write_text('{"input_text": "Is 7 odd?", "output_text": "yes"}\n'
                    '{"input_text": "Is 4 odd?", "output_text": "No"}\n'
                    '{"input_text": "Is 9 odd?", "output_text": "yes"}\n')
    cfg = load_job_dict({"kind": "evaluate", "data": str(data), "task_type": "yesno",
                         "models": [{"name": "m", "path": "tiny"}]})
    rows = load_eval_rows(cfg.data, task_type=cfg.task_type)
    completions = ["Yes.", "no, 4 is even", "No."]
    res = score_answers(rows, completions, cfg.task_type, extract="answer")
    assert (res["correct"], res["n"]) == (2, 3)
    assert [s["correct"] for s in res["samples"]] == [True, True, False]


def test_old_yes_no_name_is_refused_with_the_names_it_takes():
    with pytest.raises(Exception) as err:
        load_job_dict({"kind": "evaluate", "task_type": "yes_no", "models": [{"name": "m", "path": "tiny"}]})
    assert "yesno" in str(err.value) and "task_type" in str(err.value)
