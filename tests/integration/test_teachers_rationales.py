"""Rationale parsing and the gold-label filter on real SmolLM2-135M-Instruct output (vLLM CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayapp.config.base import EngineConfig, SamplingConfig
from rayapp.data.readers import read_jsonl
from rayapp.teachers.rationales import generate_rationales
from rayapp.teachers.templates import answers_match, get_template, parse_rationale

ROOT = Path(__file__).resolve().parents[2]
N = 24


@pytest.fixture(scope="module")
def smollm2_pool(ray_cluster):
    from rayapp.teachers.pool import VLLMEnginePool

    p = VLLMEnginePool("smollm2-135m-instruct", EngineConfig(num_engines=1, max_model_len=1024, kv_cache_gib=1))
    yield p
    p.shutdown()


def _questions(family: str) -> list[dict]:
    rows = read_jsonl(ROOT / "data" / family / "train.jsonl")
    return rows[:N]


def test_rationales_from_smollm2_parse_and_are_filtered_by_gold(smollm2_pool):
    inputs = _questions("reasoning")
    template = get_template("number")
    greedy = SamplingConfig(temperature=0.0, max_tokens=160)
    out = smollm2_pool.generate([template.render(r["input_text"]) for r in inputs], greedy)
    parsed = [parse_rationale(c.text, "number") for c in out]
    labelled = [i for i, (_, label) in enumerate(parsed) if label is not None]
    print("\n".join(f"--- {c.finish_reason}: {c.text!r}" for c in out[:3]))
    print(f"labelled {len(labelled)}/{N}; correct {sum(answers_match(parsed[i][1], inputs[i]['output_text'], 'number') for i in labelled)}")
    # The few-shot format is followed most of the time by a 135M model, not always.
    assert len(labelled) >= N // 2
    for i in labelled:
        rationale, label = parsed[i]
        float(label)  # a number string
        assert not rationale.lower().endswith(("answer is", "so", "therefore"))

    rows, stats = generate_rationales(smollm2_pool, inputs, template, greedy, gold_filter="drop", teacher_model="smollm2-135m-instruct")
    assert stats["written"] + len(stats["rejects"]) == N  # nothing disappears
    assert stats["unparsable"] == N - len(labelled)  # an empty_rationale row has a label
    assert all(r["gold_match"] is True and answers_match(r["label"], r["gold_label"], "number") for r in rows)
    assert stats["gold_mismatch"] == stats["gold_checked"] - stats["gold_agree"]
    assert all(r["teacher"]["model"] == "smollm2-135m-instruct" and r["teacher"]["template"] == template.label for r in rows)

    flagged, fstats = generate_rationales(smollm2_pool, inputs, template, greedy, gold_filter="flag")
    assert len(flagged) == len(rows) + stats["gold_mismatch"]  # greedy: same outputs, now kept and flagged
    assert sum(r["gold_match"] is False for r in flagged) == fstats["gold_flagged"] == stats["gold_mismatch"]


def test_multiple_choice_rationales_with_self_consistency(smollm2_pool):
    inputs = _questions("csqa")[:16]
    rows, stats = generate_rationales(
        smollm2_pool, inputs, get_template("choice"), SamplingConfig(temperature=0.8, max_tokens=96, seed=0),
        self_consistency_n=3, gold_filter="flag",
    )
    print(f"choice: {stats}")
    assert stats["completions"] == 3 * len(inputs)
    assert stats["written"] + len(stats["rejects"]) == len(inputs)
    assert stats["written"] >= 3
    assert stats["gold_checked"] == stats["written"] and stats["gold_agree"] >= 1  # the filter saw real agreement
    assert sum(r["gold_match"] is False for r in rows) == stats["gold_flagged"] == stats["written"] - stats["gold_agree"]
    for r in rows:
        assert r["label"] in "ABCDE" and 0 < r["agreement"] <= 1
