"""`kind: evaluate`'s table gives every accuracy with its 95% Wilson interval, and its claims
(model vs model: accuracy ratio or margin, prompt-token or latency ratio) are checked against the
measured numbers and printed, met or not."""

from __future__ import annotations

import pytest

from rayapp.config.loader import ConfigError, load_job_dict
from rayapp.evaluation import check_claims, claims_table, score_answers, table, wilson_interval


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(345, 400)
    assert (round(lo, 3), round(hi, 3)) == (0.825, 0.893)
    assert wilson_interval(0, 400)[0] == 0.0 and 0.0 < wilson_interval(0, 400)[1] < 0.01
    assert wilson_interval(400, 400)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_scores_carry_the_interval():
    res = score_answers([{"input_text": "q", "label": "1"}, {"input_text": "r", "label": "2"}], ["1", "3"], "number")
    assert res["accuracy"] == 0.5 and res["ci95"] == list(wilson_interval(1, 2))


def _results():
    def r(name, k, tok, lat):
        return {"name": name, "accuracy": k / 400, "correct": k, "n": 400, "ci95": list(wilson_interval(k, 400)),
                "prompt_tokens_per_request": tok, "latency_s_per_request": lat}

    return [r("teacher", 340, 19.0, 0.02), r("sbs", 290, 23.0, 0.004), r("std", 330, 23.0, 0.004), r("few-shot", 12, 184.0, 0.8)]


def _cfg(claims):
    return load_job_dict({"kind": "evaluate", "models": [{"name": n, "path": "tiny"} for n in ("teacher", "sbs", "std", "few-shot")],
                          "claims": claims})


def test_claims_are_checked_against_the_table_met_or_not():
    cfg = _cfg([
        {"model": "sbs", "versus": "teacher", "ratio_at_least": 0.8},
        {"model": "sbs", "versus": "std", "margin_at_least": 0.10, "otherwise": "not at this data size"},
        {"model": "sbs", "versus": "few-shot", "metric": "prompt_tokens", "ratio_at_most": 0.2},
        {"model": "sbs", "versus": "few-shot", "metric": "latency", "ratio_at_most": 0.1},
    ])
    checked = check_claims(cfg.claims, _results())
    assert [c["holds"] for c in checked] == [True, False, True, True]
    assert checked[0]["measured"] == pytest.approx(290 / 340)
    assert checked[1]["measured"] == pytest.approx(-0.1)
    text = claims_table(checked)
    assert "sbs accuracy >= std + 0.1" in text and "NO" in text and "not at this data size" in text
    assert "sbs prompt tokens/request <= 0.2 x few-shot" in text


def test_unmeasured_latency_is_neither_met_nor_failed():
    results = _results()
    for r in results:
        r["latency_s_per_request"] = None
    checked = check_claims(_cfg([{"model": "sbs", "versus": "few-shot", "metric": "latency", "ratio_at_most": 0.1}]).claims, results)
    assert checked[0]["holds"] is None


def test_table_shows_each_interval():
    text = table(_results())
    assert "held-out questions: 400" in text and "95% interval" in text
    assert [line.split()[1] for line in text.splitlines()[2:]] == ["400"] * 4
    assert "[0.812, 0.882]" in text  # teacher: 340/400


def test_claims_name_known_models_and_one_bound():
    with pytest.raises(ConfigError, match="not in models"):
        _cfg([{"model": "sbs", "versus": "nobody", "ratio_at_least": 0.8}])
    with pytest.raises(ConfigError, match="exactly one of"):
        _cfg([{"model": "sbs", "versus": "std", "ratio_at_least": 0.8, "margin_at_least": 0.1}])


def test_a_model_may_answer_only_the_first_questions(tmp_path, monkeypatch):
    """models[].max_examples: a costly baseline answers the first N held-out questions; its n is its own."""
    import rayapp.evaluation as ev

    data = tmp_path / "test.jsonl"
    data.write_text("".join(f'{{"input_text": "What is {i} + 1?", "output_text": "{i + 1}"}}\n' for i in range(10)))
    cfg = load_job_dict({"kind": "evaluate", "data": str(data), "task_type": "number", "latency_samples": 0,
                         "models": [{"name": "all", "path": "tiny"}, {"name": "first4", "path": "tiny", "max_examples": 4}]})
    monkeypatch.setattr(ev, "evaluate_answers", lambda path, rows, **kw: ev.score_answers(rows, [r["label"] for r in rows], "number"))
    rows = ev.load_eval_rows(cfg.data, None, cfg.task_type)
    results = [ev.evaluate_model(m, cfg, rows) for m in cfg.models]
    assert [(r["n"], r["accuracy"]) for r in results] == [(10, 1.0), (4, 1.0)]
    assert results[1]["ci95"] == list(wilson_interval(4, 4))


def test_vllm_backend_gets_messages_when_the_chat_template_is_used(tiny_model_dir):
    """With the chat template, the vLLM backend is handed messages (the engine renders them and
    encodes without special tokens, as the transformers backend does), not rendered strings, which
    the engine would encode with special tokens again: two BOS on a tokenizer that adds one."""
    from types import SimpleNamespace

    from rayapp import evaluation as ev
    from rayapp.models.io import load_tokenizer
    from rayapp.teachers.pool import LocalEngine

    seen = []

    class Generator:
        def generate(self, prompts, sampling):
            seen.append(prompts)
            return [SimpleNamespace(text="2") for _ in prompts]

    rows = [{"input_text": "1 + 1 =", "label": "2"}]
    for chat, expect_messages in (("auto", True), ("never", False)):
        res = ev.evaluate_answers(tiny_model_dir, rows, task_type="number", backend="vllm", chat_template=chat,
                                  generator=Generator())
        assert res["accuracy"] == 1.0
        (prompt,) = seen.pop()
        assert isinstance(prompt, list) is expect_messages, prompt
    # The ids the engine makes of those messages are the transformers backend's ids.
    tok = load_tokenizer(str(tiny_model_dir))
    rendered = ev.render_prompts(tok, ["1 + 1 ="])[0]
    engine_ids = LocalEngine.encode(SimpleNamespace(tokenizer=tok), [{"role": "user", "content": "1 + 1 ="}])
    assert engine_ids == tok(rendered, add_special_tokens=False)["input_ids"]
