"""Templates, the rationale/label parser and answer matching on hand-written teacher outputs,
and generate_rationales' bookkeeping with a fake generator (the real one is tested in
tests/integration/test_teachers_rationales.py)."""

from __future__ import annotations

import sys

import pytest

from rayapp.config.base import SamplingConfig
from rayapp.teachers import EMPTY_PROMPT, PROMPT_TOO_LONG, Completion
from rayapp.teachers.rationales import RationaleConfigError, generate_rationales, majority
from rayapp.teachers.templates import (
    DEFAULT_TEMPLATES,
    TASK_TYPES,
    answers_match,
    get_template,
    normalize_label,
    parse_rationale,
)


@pytest.mark.parametrize(
    "text, task, rationale, label",
    [
        ("3 * 4 = 12, minus 2 is 10. So the answer is 10.", "number", "3 * 4 = 12, minus 2 is 10.", "10"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "number", "Natalia sold 48/2 = 24 clips.", "72"),
        ("It costs $1,250.50 in total. The answer is $1,250.50.", "number", "It costs $1,250.50 in total.", "1250.5"),
        ("Half of 7 is 3.5. So the answer is 3.5.", "number", "Half of 7 is 3.5.", "3.5"),
        ("Debt grows. Therefore, the answer is -4 dollars.", "number", "Debt grows.", "-4"),
        ("We get \\boxed{42}", "number", "We get", "42"),
        ("7500 biscuits. So the answer is 7500 - 2499 - 1 = 5000.", "number", "7500 biscuits.", "5000"),
        ("Plates go in cupboards. So the answer is (B).", "choice", "Plates go in cupboards.", "B"),
        ("Plates go in cupboards. So the answer is B) cupboard.", "choice", "Plates go in cupboards.", "B"),
        ("Plates go in cupboards.\nAnswer: cupboard (B)", "choice", "Plates go in cupboards.", "B"),
        ("15 is odd. So the answer is No.", "yesno", "15 is odd.", "no"),
        ("Fish have gills. the answer is: **True**", "yesno", "Fish have gills.", "yes"),
        ("Paris is the capital. So the answer is Paris. Anything else?", "free", "Paris is the capital.", "Paris"),
        # the last marker wins: a few-shot echo before the real answer does not fool the parser
        ("So the answer is 9. Now: 2 + 2 = 4. So the answer is 4.", "number", "So the answer is 9. Now: 2 + 2 = 4.", "4"),
    ],
)
def test_parse_rationale_on_well_formed_outputs(text, task, rationale, label):
    assert parse_rationale(text, task) == (rationale, label)


@pytest.mark.parametrize(
    "text, task",
    [
        ("", "number"),
        ("I think it is twelve-ish", "number"),  # no marker
        ("So the answer is unknown.", "number"),  # marker, no number
        ("So the answer is maybe.", "yesno"),
        ("So the answer is (F).", "choice"),  # not an option letter
        ("So the answer is .", "free"),
        ("3 + 4 = 7, so the answer is", "number"),  # truncated before the answer
    ],
)
def test_parse_rationale_on_malformed_outputs_gives_no_label(text, task):
    rationale, label = parse_rationale(text, task)
    assert label is None
    assert isinstance(rationale, str)


def test_gsm8k_marker_wins_over_answer_phrase():
    assert parse_rationale("the answer is 5 apples\n#### 6", "number")[1] == "6"


@pytest.mark.parametrize(
    "pred, gold, task, same",
    [
        ("10", "10.0", "number", True),
        ("1,000", "1000", "number", True),
        ("$18", "18 dollars", "number", True),
        ("1/2", "0.5", "number", True),
        ("10", "11", "number", False),
        ("(b)", "B", "choice", True),
        ("B", "C", "choice", False),
        ("Yes", "true", "yesno", True),
        ("no", "yes", "yesno", False),
        ("The Eiffel Tower!", "eiffel tower", "free", True),
        ("Paris", "London", "free", False),
        (None, "1", "number", False),
        ("x", None, "free", False),
    ],
)
def test_answers_match(pred, gold, task, same):
    assert answers_match(pred, gold, task) is same


def test_normalize_label_forms():
    assert normalize_label(" **42**. ", "number") == "42"
    assert normalize_label("cupboard", "choice") is None
    assert normalize_label("", "free") is None


def test_every_task_type_has_a_template_whose_shots_parse_back():
    for task in TASK_TYPES:
        t = DEFAULT_TEMPLATES[task]
        assert t.task_type == task and t.shots
        for shot in t.shots:
            rationale, label = parse_rationale(t.answer_line(shot), task)
            assert rationale == shot.rationale
            assert answers_match(label, shot.answer, task)


def test_template_renders_chat_and_plain_text():
    t = get_template("number")
    msgs = t.render("What is 2 + 2?", chat=True)
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "What is 2 + 2?"}
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(t.shots)
    text = t.render("What is 2 + 2?", chat=False)
    assert text.endswith("Q: What is 2 + 2?\nA:") and "So the answer is 10." in text


def test_custom_template_changes_the_recorded_label():
    base = get_template("yesno")
    custom = get_template("yesno", system="Answer yes or no.", shots=[{"question": "Q?", "rationale": "R.", "answer": "yes"}])
    assert custom.name == "cot_yesno-custom" and custom.label != base.label
    assert base.label == get_template("yesno").label  # deterministic fingerprint
    with pytest.raises(ValueError, match="unknown task_type"):
        get_template("essay")


def test_majority_breaks_ties_by_first_seen():
    assert majority(["4", None, "5", "5", "4"]) == ("4", 2)
    assert majority([None, None]) == (None, 0)


class FakeGenerator:
    """Returns canned texts per prompt; marks empty prompts the way the pool does."""

    model_path = "fake-teacher"

    def __init__(self, texts: dict[int, list[str]]):
        self.texts = texts
        self.seen = []

    def generate(self, prompts, sampling):
        self.seen.append((prompts, sampling))
        out = []
        for i, p in enumerate(prompts):
            if not p:
                out.append(Completion("", [], EMPTY_PROMPT, prompt_index=i, error="the prompt is empty"))
            elif self.texts[i] == "LONG":
                out.append(Completion("", [], PROMPT_TOO_LONG, prompt_index=i, error="too long"))
            else:
                out += [Completion(t, [1], "stop", prompt_index=i, sample_index=k) for k, t in enumerate(self.texts[i])]
        return out


def test_generate_rationales_counts_every_outcome():
    inputs = [
        {"input_text": "2+2?", "output_text": "4", "id": "a"},  # agrees with gold
        {"input_text": "3+3?", "output_text": "7"},  # disagrees -> dropped
        {"input_text": "5+5?"},  # no gold
        {"input_text": "   "},  # empty
        {"input_text": "huge"},  # too long
        {"input_text": "1+1?"},  # unparsable
        {"input_text": "9+1?"},  # label without reasoning
    ]
    texts = {0: ["2+2=4. So the answer is 4."], 1: ["3+3=6. So the answer is 6."], 2: ["5+5=10. So the answer is 10."],
             4: "LONG", 5: ["it is two"], 6: ["So the answer is 10."]}
    gen = FakeGenerator(texts)
    rows, stats = generate_rationales(gen, inputs, get_template("number"), SamplingConfig(temperature=0.0), gold_filter="drop")
    assert [r["input_text"] for r in rows] == ["2+2?", "5+5?"]
    assert rows[0]["label"] == "4" and rows[0]["gold_match"] is True and rows[0]["id"] == "a"
    assert rows[0]["teacher"]["model"] == "fake-teacher" and rows[0]["teacher"]["template"].startswith("cot_number@")
    assert "gold_label" not in rows[1]
    assert stats["written"] == 2 and stats["inputs"] == 7
    assert {r["reason"]: r["index"] for r in stats["rejects"]} == {
        "gold_mismatch": 1, "empty_prompt": 3, "prompt_too_long": 4, "unparsable": 5, "empty_rationale": 6}
    assert stats["written"] + len(stats["rejects"]) == stats["inputs"]  # nothing disappears
    assert isinstance(gen.seen[0][0][0], list)  # chat messages by default

    rows, stats = generate_rationales(FakeGenerator(texts), inputs, get_template("number"), SamplingConfig(temperature=0.0), gold_filter="flag")
    assert [r.get("gold_match") for r in rows] == [True, False, None] and stats["gold_flagged"] == 1


def test_self_consistency_takes_the_majority_and_its_rationale():
    texts = {0: ["A. So the answer is 5.", "B. So the answer is 6.", "C. So the answer is 6.", "garbage"]}
    gen = FakeGenerator(texts)
    rows, stats = generate_rationales(gen, ["q"], get_template("number"), SamplingConfig(temperature=0.8), self_consistency_n=4)
    assert gen.seen[0][1].n == 4
    assert rows[0]["label"] == "6" and rows[0]["rationale"] == "B." and rows[0]["agreement"] == 0.5
    assert stats["unparsable_completions"] == 1
    with pytest.raises(RationaleConfigError, match="temperature"):
        generate_rationales(gen, ["q"], get_template("number"), SamplingConfig(temperature=0.0), self_consistency_n=3)


def test_importing_teachers_loads_no_ray_or_vllm():
    import subprocess

    code = "import sys, rayapp.teachers, rayapp.teachers.rationales, rayapp.config.batch; print('ray' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
