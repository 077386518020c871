import math

import pytest
import torch

from rayapp.algorithms.sft import masked_mean, masked_sum, next_token_accuracy_counts, token_nll_sum


def test_token_nll_sum_hand_computed():
    # B=1, T=3, V=2. logits[t] predicts labels[t+1]; label at t=0 is never predicted.
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    # t=0 predicts y=1 from (0, 0): -log(1/2) = log 2
    # t=1 predicts y=0 from (2, 0): -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    # t=2's logits predict nothing (no t=3).
    loss, n = token_nll_sum(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(2) + math.log(1 + math.exp(-2)), rel=1e-6)


def test_ignored_labels_do_not_count():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 0]])
    loss, n = token_nll_sum(logits, labels)
    # only t=1 -> y=0: log(1 + e^-2)
    assert n.item() == 1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_sums_over_micro_batches_combine_to_global_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    labels[0, :5] = -100   # uneven token counts per micro-batch
    labels[2, 2:] = -100
    full_sum, full_n = token_nll_sum(logits, labels)
    parts = [token_nll_sum(logits[i:i + 1], labels[i:i + 1]) for i in range(4)]
    s = sum(p[0] for p in parts)
    n = sum(p[1] for p in parts)
    assert torch.allclose(s / n, full_sum / full_n)
    mean_of_means = sum(p[0] / p[1] for p in parts) / 4
    assert not torch.allclose(mean_of_means, full_sum / full_n)


def test_accuracy_counts():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 1, -100]])
    # t=0 argmax 1 == y1=1 correct; t=1 argmax 0 != y2=1 wrong; t=2 -> y3 ignored
    correct, n = next_token_accuracy_counts(logits, labels)
    assert (correct.item(), n.item()) == (1, 2)


def test_masked_helpers():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_sum(v, m).item() == 4.0            # 1 + 3
    assert masked_mean(v, m).item() == 2.0           # (1 + 3) / 2
    per_row = masked_mean(v, m, dim=1)
    assert per_row.tolist() == [2.0, 0.0]            # empty row gives 0, not NaN


def test_shape_errors():
    with pytest.raises(ValueError, match="expected logits"):
        token_nll_sum(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_masked_helpers_ignore_nan_in_masked_out_entries():
    v = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    m = torch.tensor([1.0, 0.0, 0.0])
    out = masked_mean(v, m)
    assert out.item() == 1.0 and masked_sum(v, m).item() == 1.0
    out.backward()
    assert v.grad.tolist() == [1.0, 0.0, 0.0]
