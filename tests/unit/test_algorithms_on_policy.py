"""On-policy distillation maths (rayapp.algorithms.on_policy) on hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rayapp.algorithms import IGNORE_INDEX
from rayapp.algorithms.on_policy import (
    on_policy_distill_loss,
    reverse_kl_advantages,
    reverse_kl_sum,
    tempered_token_logps,
)


def test_advantage_is_the_negative_reverse_kl_per_token():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])   # (B, T)
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-2.1, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reverse_kl_advantages(student, teacher, mask)
    # -(s - t): 0.5 - 1.0 0.0 / -2.0 2.0 (masked 0)
    assert torch.allclose(adv, torch.tensor([[-0.5, 1.0, 0.0], [-2.0, 2.0, 0.0]]))
    # student more confident than the teacher on a token -> negative advantage (pushed down)
    assert adv[1, 0] < 0 and adv[1, 1] > 0
    # sum of s - t over the 5 tokens: 0.5 - 1 + 0 + 2 - 2 = -0.5
    assert float(reverse_kl_sum(student, teacher, mask)) == pytest.approx(-0.5)


def test_advantage_adds_the_weighted_task_reward_on_every_token():
    student = torch.zeros(2, 3)
    teacher = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = reverse_kl_advantages(student, teacher, mask, scores=torch.tensor([1.0, 0.0]), reward_weight=0.5)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    # reward_weight 0 ignores the scores
    assert torch.count_nonzero(reverse_kl_advantages(student, teacher, mask, scores=torch.tensor([1.0, 1.0]))) == 0


def test_advantage_carries_no_gradient():
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = reverse_kl_advantages(student, torch.zeros(1, 2), torch.ones(1, 2))
    assert not adv.requires_grad


def test_tempered_logps_divide_the_logits_before_log_softmax():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])     # (1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 0, IGNORE_INDEX]])          # position 0 predicts token 0
    lp1, mask = tempered_token_logps(logits, labels, 1.0)
    lp2, _ = tempered_token_logps(logits, labels, 2.0)
    # T=1: log(e^2 / (e^2 + 1)); T=2: log(e^1 / (e^1 + 1))
    assert float(lp1[0, 0]) == pytest.approx(2 - math.log(math.exp(2) + 1), abs=1e-6)
    assert float(lp2[0, 0]) == pytest.approx(1 - math.log(math.e + 1), abs=1e-6)
    assert mask.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="temperature"):
        tempered_token_logps(logits, labels, 0.0)


def test_loss_gradient_at_ratio_one_is_minus_advantage_over_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clip = on_policy_distill_loss(logp, old, adv, mask, clip_eps=0.2)
    # rho = 1: L = -(0.5 - 1.0) / 2 = 0.25; dL/dlogp = -A / 2 on the masked tokens, 0 on the third
    assert float(loss.detach()) == pytest.approx(0.25)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, 0.5, 0.0]]))
    assert float(clip) == 0.0


def test_loss_clips_a_ratio_outside_the_range_and_uses_the_normaliser():
    # token 0: rho = e^0.5 = 1.65 > 1.2 with A > 0: clipped (no gradient); token 1: rho = 1, A < 0
    old = torch.tensor([[-1.0, -1.0]])
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    loss, clip = on_policy_distill_loss(logp, old, adv, mask, clip_eps=0.2, normaliser=4.0)
    # max(-1 * 1.6487, -1 * 1.2) = -1.2 ; max(2 * 1, 2 * 1) = 2 ; sum 0.8 / 4 = 0.2
    assert float(loss.detach()) == pytest.approx(0.2, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.5]]))
    assert float(clip) == pytest.approx(0.5)


def test_a_step_on_the_loss_lowers_the_reverse_kl_to_the_teacher():
    """One categorical step: the student samples every token of a 3-token vocabulary (exact
    expectation by enumeration), and gradient descent on the loss lowers KL(student || teacher)."""
    teacher = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0]), -1)
    z = torch.tensor([-1.0, 0.5, 1.0], requires_grad=True)

    def kl(zz):
        s = torch.log_softmax(zz, -1)
        return float((s.exp() * (s - teacher)).sum())

    before = kl(z.detach())
    for _ in range(20):
        s = torch.log_softmax(z, -1)
        probs = s.exp().detach()
        # every token as a sample, weighted by its probability under the student (the expectation)
        adv = reverse_kl_advantages(s.detach().unsqueeze(0), teacher.unsqueeze(0), torch.ones(1, 3))
        per_tok = -(adv * s.unsqueeze(0)) * probs.unsqueeze(0)
        loss = per_tok.sum()
        z.grad = None
        loss.backward()
        with torch.no_grad():
            z -= 0.5 * z.grad
    assert kl(z.detach()) < 0.5 * before
