import math

import pytest
import torch
from torch import nn

from rayapp.algorithms.features import (
    FeatureProjector,
    feature_loss,
    layer_pairs_feature_loss,
    uniform_layer_map,
)


def test_projector_shapes_and_identity():
    proj = FeatureProjector(64, 128, num_pairs=3)
    out = proj([torch.randn(2, 5, 64) for _ in range(3)])
    assert [tuple(o.shape) for o in out] == [(2, 5, 128)] * 3
    assert sum(p.numel() for p in proj.parameters()) == 3 * 64 * 128
    same = FeatureProjector(32, 32, num_pairs=2)
    assert all(isinstance(m, nn.Identity) for m in same.maps)
    assert sum(p.numel() for p in same.parameters()) == 0
    h = torch.randn(1, 2, 32)
    assert same([h, h])[0] is h
    with pytest.raises(ValueError, match="expected 2 hidden states"):
        same([h])


def test_uniform_layer_map():
    assert uniform_layer_map(2, 6) == [(1, 3), (2, 6)]
    assert uniform_layer_map(3, 4) == [(1, 1), (2, 2), (3, 4)]     # floor(4/3)=1, floor(8/3)=2, 4
    assert uniform_layer_map(4, 2) == [(1, 1), (2, 1), (3, 1), (4, 2)]  # floor(2/4)=0 -> 1
    assert uniform_layer_map(2, 2, include_embeddings=True) == [(0, 0), (1, 1), (2, 2)]


def test_mse_and_cosine_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])   # (1, 2, 2)
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    mask = torch.tensor([[1, 1]])
    # mse: token0 ((1)^2 + (-1)^2)/2 = 1; token1 ((-1)^2 + (-1)^2)/2 = 1 -> sum 2
    loss, n = feature_loss(s, t, mask, "mse")
    assert (loss.item(), n.item()) == (2.0, 2)
    # cosine: token0 orthogonal -> 1 - 0 = 1; token1 parallel -> 1 - 1 = 0 -> sum 1
    loss, _ = feature_loss(s, t, mask, "cosine")
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # 45 degrees: 1 - cos(pi/4)
    loss, _ = feature_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]]), torch.ones(1, 1), "cosine")
    assert loss.item() == pytest.approx(1 - math.sqrt(0.5), rel=1e-6)
    # mask drops token0
    loss, n = feature_loss(s, t, torch.tensor([[0, 1]]), "mse")
    assert (loss.item(), n.item()) == (1.0, 1)


def test_feature_loss_errors():
    with pytest.raises(ValueError, match="unknown feature loss 'l1'"):
        feature_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), "l1")
    with pytest.raises(ValueError, match="project the student first"):
        feature_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3), torch.ones(1, 1))


def test_layer_pairs_loss_trains_projector_not_teacher():
    torch.manual_seed(0)
    student_hs = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(3)]   # embeddings + 2 layers
    teacher_hs = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(5)]   # embeddings + 4 layers
    lmap = uniform_layer_map(2, 4)                                              # [(1, 2), (2, 4)]
    proj = FeatureProjector(4, 8, num_pairs=len(lmap))
    mask = torch.ones(2, 3)
    loss, n = layer_pairs_feature_loss(student_hs, teacher_hs, lmap, proj, mask, "mse")
    expected = sum(feature_loss(proj.maps[i](student_hs[s]), teacher_hs[t], mask)[0]
                   for i, (s, t) in enumerate(lmap)) / 2
    assert n.item() == 6 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(m.weight.grad is not None for m in proj.maps)
    assert student_hs[0].grad is None and student_hs[1].grad is not None
    assert all(t.grad is None for t in teacher_hs)


def test_zero_when_equal():
    h = torch.randn(2, 3, 4)
    for kind in ("mse", "cosine"):
        assert feature_loss(h, h.clone(), torch.ones(2, 3), kind)[0].abs().item() < 1e-5
