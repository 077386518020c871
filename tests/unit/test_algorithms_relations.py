import math

import pytest
import torch

from rayapp.algorithms.relations import (
    RELATION_LOSSES,
    masked_mean_pool,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_loss,
)


def test_masked_mean_pool():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # row0: ((1,2) + (3,4)) / 2 = (2, 3); row1 empty -> zeros
    assert masked_mean_pool(h, m).tolist() == [[2.0, 3.0], [0.0, 0.0]]


def test_rkd_distance_hand_computed():
    s = torch.tensor([[0.0], [1.0], [3.0]])   # d = 1, 3, 2; mean 2 -> psi (.5, 1.5, 1)
    t = torch.tensor([[0.0], [2.0], [4.0]])   # d = 2, 4, 2; mean 8/3 -> psi (.75, 1.5, .75)
    # diffs .25, 0, .25 -> huber .5 x^2 = .03125, 0, .03125 -> mean 0.0208333
    assert rkd_distance_loss(s, t).item() == pytest.approx(0.0625 / 3, rel=1e-5)


def test_rkd_angle_hand_computed():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])                   # angles 90, 45, 45
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])      # equilateral: 60 x 3
    # cos diffs: 0 - .5, cos45 - .5, cos45 - .5 -> huber .125, .0214466, .0214466; mean 0.0559644
    d = math.sqrt(0.5) - 0.5
    assert rkd_angle_loss(s, t).item() == pytest.approx((0.125 + d * d) / 3, rel=1e-5)


def test_similarity_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # G = I, rows already unit
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])   # G = all ones, rows -> (1, 1)/sqrt2
    # ||I - J/sqrt2||^2 = 2 (1 - 1/sqrt2)^2 + 2 (1/2) = 4 - 2 sqrt2; / N^2 = 1 - sqrt2/2
    assert similarity_loss(s, t).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-5)


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
def test_invariant_to_scaling_and_zero_on_match(name):
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 8)
    loss = RELATION_LOSSES[name]
    base = loss(s, t)
    assert base.item() > 1e-4
    assert loss(s * 7.0, t * 0.01).item() == pytest.approx(base.item(), rel=1e-4)
    assert loss(s * 3.0, s).abs().item() < 1e-6        # same geometry, different scale -> 0


def test_rkd_translation_invariant_and_grad_flows_to_student_only():
    torch.manual_seed(1)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    for fn in (rkd_distance_loss, rkd_angle_loss):
        assert fn(s + 5.0, t - 2.0).item() == pytest.approx(fn(s, t).item(), rel=1e-4)
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t) + similarity_loss(s, t)).backward()
    assert torch.isfinite(s.grad).all() and t.grad is None


def test_coincident_points_keep_gradients_finite():
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    rkd_distance_loss(s, torch.randn(3, 2)).backward()
    assert torch.isfinite(s.grad).all()


def test_batch_too_small():
    with pytest.raises(ValueError, match="RKD angle loss needs at least 3 examples per batch, got 2"):
        rkd_angle_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same N"):
        rkd_distance_loss(torch.randn(2, 3), torch.randn(3, 3))
