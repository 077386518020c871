import math

import pytest
import torch

from rayapp.algorithms.sft import token_nll_sum
from rayapp.algorithms.step_by_step import split_task_nll_sums, two_task_examples, two_task_loss


def test_two_task_examples():
    ex = two_task_examples("Is 7 prime?", "yes", "7 has no divisors but 1 and 7.")
    assert ex == [("predict", "predict: Is 7 prime?", "yes"),
                  ("explain", "explain: Is 7 prime?", "7 has no divisors but 1 and 7.")]


def test_two_task_examples_custom_prefixes_and_no_rationale():
    assert two_task_examples("q", "a", "r", "[label] ", "[rationale] ") == [
        ("predict", "[label] q", "a"), ("explain", "[rationale] q", "r")]
    assert two_task_examples("q", "a", None) == [("predict", "predict: q", "a")]
    assert two_task_examples("q", "a", "  ") == [("predict", "predict: q", "a")]


def test_two_task_examples_rationale_target_can_end_with_the_label():
    ex = two_task_examples("4 - 1 - 7 =", "-4", " 4 - 1 = 3. 3 - 7 = -4. ", answer_marker="So the answer is")
    assert ex == [("predict", "predict: 4 - 1 - 7 =", "-4"),
                  ("explain", "explain: 4 - 1 - 7 =", "4 - 1 = 3. 3 - 7 = -4. So the answer is -4.")]
    assert two_task_examples("q", "a", None, answer_marker="So the answer is") == [("predict", "predict: q", "a")]


def test_two_task_loss_weights():
    lab, rat = torch.tensor(2.0), torch.tensor(4.0)
    # 0.25 * 2 + 0.75 * 4 = 0.5 + 3 = 3.5
    assert two_task_loss(lab, rat, 0.25).item() == pytest.approx(3.5)
    # alpha = 1 (rationale weight 0) is plain fine-tuning, even with a non-finite rationale loss
    assert two_task_loss(lab, torch.tensor(float("inf")), 1.0).item() == 2.0
    assert two_task_loss(lab, rat, 0.0).item() == 4.0
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        two_task_loss(lab, rat, 1.5)


def test_two_task_loss_gradient_split():
    lab = torch.tensor(1.0, requires_grad=True)
    rat = torch.tensor(1.0, requires_grad=True)
    two_task_loss(lab, rat, 0.3).backward()
    assert lab.grad.item() == pytest.approx(0.3)
    assert rat.grad.item() == pytest.approx(0.7)


def test_split_task_nll_sums():
    # Row 0 (label task): t=0 predicts y=1 from logits (0, 0): log 2.
    # Row 1 (rationale task): t=0 predicts y=0 from (2, 0): log(1 + e^-2).
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1], [-100, 0]])
    ls, ln, rs, rn = split_task_nll_sums(logits, labels, torch.tensor([False, True]))
    assert (ln.item(), rn.item()) == (1, 1)
    assert ls.item() == pytest.approx(math.log(2), rel=1e-6)
    assert rs.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    total, n = token_nll_sum(logits, labels)
    assert (ls + rs).item() == pytest.approx(total.item()) and (ln + rn).item() == n.item()
