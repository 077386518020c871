import math

import pytest
import torch

from rayapp.algorithms.preference import bradley_terry_loss, dpo_loss, sequence_logps
from rayapp.algorithms.sft import token_logps, token_nll_sum


def test_bradley_terry_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sig(2) = log(1 + e^-2) = 0.126928; -log sig(-1) = log(1 + e) = 1.313262; mean 0.720095
    loss, acc = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2, rel=1e-6)
    assert acc.item() == 0.5


def test_bradley_terry_gradient():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(rc, rr)[0].backward()
    # d/d rc of -log sig(rc - rr) = -(1 - sig(0)) = -0.5
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_sequence_logps_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 1.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    # t0 -> y=1 from (0,0): log .5; t1 -> y=0 from (2,0): -log(1 + e^-2); sum -0.820075
    expected = math.log(0.5) - math.log1p(math.exp(-2))
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx(expected / 2, rel=1e-6)
    # consistent with the NLL sum
    assert -sequence_logps(logits, labels).item() == pytest.approx(token_nll_sum(logits, labels)[0].item())
    lp, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True]] and lp.shape == (1, 2)


def test_sequence_logps_empty_row():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[-100, -100, -100], [-100, 2, 3]])
    out = sequence_logps(logits, labels, average=True)
    assert out[0].item() == 0.0 and out[1].item() == pytest.approx(math.log(0.25))


def test_dpo_hand_computed():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # chosen reward .5 * (-1 + 2) = .5; rejected .5 * (-3 + 2) = -.5; h = 1; loss log(1 + e^-1) = 0.313262
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert (cr.item(), rj.item()) == (0.5, -0.5)
    # label smoothing .1: .9 * 0.313262 + .1 * log(1 + e) = 0.413262
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e), rel=1e-6)


def test_dpo_starts_at_log2_and_gradient():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-6.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # dL/dpc = -beta * sig(-h) = -.1 * .5 at h = 0
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_dpo_reference_gets_no_gradient_and_bad_args():
    ref = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0]), ref, ref, 0.1)[0].backward()
    assert ref.grad is None
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(ref, ref, ref, ref, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(ref, ref, ref, ref, 0.1, label_smoothing=0.5)
