"""Rule-based rewards, user rewards by import path, and their config errors."""

from __future__ import annotations

import pickle

import pytest

from rayapp.config.rl import RewardSpec
from rayapp.rewards import (
    RewardConfigError,
    build_reward,
    chain_steps,
    exact_match,
    extract_answer,
    format_match,
    length,
    load_reward_function,
)


def test_extract_answer_prefers_the_answer_phrase_then_the_last_number():
    assert extract_answer("12 + 30 = 42. So the answer is 42.") == "42"
    assert extract_answer("so the Answer is -7 (not 3)") == "-7"
    assert extract_answer("first 3 then 5") == "5"
    assert extract_answer("no digits") is None


def test_exact_match_compares_numbers_as_numbers():
    row = {"answer": "42"}
    assert exact_match("12 + 30 = 42. So the answer is 42.", row) == 1.0
    assert exact_match("So the answer is 42.0", row) == 1.0
    assert exact_match("12 + 30 = 42. So the answer is 41.", row) == 0.0  # the final answer counts, not the line
    assert exact_match("", row) == 0.0
    assert exact_match("the answer is 7", {"label": "7"}, key="label") == 1.0


def test_exact_match_names_the_missing_field():
    with pytest.raises(RewardConfigError, match="'answer'.*found keys: label, prompt"):
        exact_match("the answer is 1", {"label": "1", "prompt": "q"})


def test_chain_steps_credits_the_right_steps_before_the_first_wrong_one():
    row = {"prompt": "4 - 1 - 7 ="}
    assert chain_steps("4 - 1 = 3. 3 - 7 = -4. So the answer is -4.", row) == 1.0
    assert chain_steps("4 - 1 = 3. 3 - 7 = -5. So the answer is -5.", row) == 0.5
    assert chain_steps("4 - 1 = 2. 2 - 7 = -5.", row) == 0.0  # the second step follows from a wrong first
    assert chain_steps("1 + 1 = 2. 3 - 7 = -4.", row) == 0.0  # equations unrelated to the question earn nothing
    assert chain_steps("4 - 1 = 3.", row) == 0.5  # a short completion has fewer steps
    assert chain_steps("So the answer is -4.", row) == 0.0
    # the prompt's last chain counts (an example before it does not); x and * multiply; negative terms
    assert chain_steps("2 * 3 = 6. 6 x 4 = 24.", {"prompt": "1 + 1 = 2\nNow: 2 * 3 x 4 ="}) == 1.0
    assert chain_steps("5 + -2 = 3.", {"prompt": "5 + -2 ="}) == 1.0
    assert chain_steps("-3 - 10 = -13.", {"prompt": "-03 - 10 ="}) == 1.0  # the first term as written
    assert chain_steps("anything", {"prompt": "no chain here"}) == 0.0
    with pytest.raises(RewardConfigError, match="'question'.*found keys: prompt"):
        chain_steps("1", {"prompt": "1 + 2 ="}, key="question")


def test_format_and_length():
    assert format_match("12 + 30 = 42. So the answer is 42.", {}) == 1.0
    assert format_match("12 + 30 = 42. So the answer is 42. extra words", {}) == 0.0
    assert format_match("The answer is 42.", {}) == 0.0
    assert length("x" * 40, {}) == 1.0
    assert length("x" * 60, {}, target=40, scale=40) == pytest.approx(0.5)
    assert length("", {}, target=40, scale=20) == 0.0


def test_combined_reward_weights_terms_reports_parts_and_pickles():
    reward = build_reward([RewardSpec(function="exact_match"), RewardSpec(function="format", weight=0.5)])
    total, parts = reward("12 + 30 = 42. So the answer is 42.", {"answer": "42"})
    assert total == 1.5 and parts == {"reward_exact_match": 1.0, "reward_format": 1.0}
    again = pickle.loads(pickle.dumps(reward))
    assert again("The answer is 42.", {"answer": "42"}) == (1.0, {"reward_exact_match": 1.0, "reward_format": 0.0})


def test_user_function_by_import_path():
    assert load_reward_function("math:fabs") is not None
    reward = build_reward([RewardSpec(function="tests.unit.test_rewards:shouting", args={"bonus": 2.0})])
    assert reward("HELLO", {})[0] == 3.0


def shouting(completion: str, row: dict, bonus: float = 0.0) -> float:
    return (1.0 if completion.isupper() else 0.0) + bonus


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", "neither a built-in reward .* nor an import path"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("math:not_there", "has no callable 'not_there'"),
    ],
)
def test_bad_reward_names_fail_when_built(name, message):
    with pytest.raises(RewardConfigError, match=message):
        build_reward([RewardSpec(function=name)])


def test_wrong_signature_is_reported():
    reward = build_reward([RewardSpec(function="math:fabs")])
    with pytest.raises(RewardConfigError, match="cannot be called as f\\(completion, row"):
        reward("x", {})
