import math

import pytest
import torch

from rayapp.algorithms.kd import (
    KD_DIVERGENCES,
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    topk_buckets_renormalised,
    topk_buckets_with_tail,
    topk_kd_loss,
)

LOG = torch.log


def logits_of(probs):
    return LOG(torch.tensor(probs)).view(1, 1, -1)   # (B=1, T=1, V)


ONE = torch.ones(1, 1, dtype=torch.bool)


def test_kl_direction():
    p = LOG(torch.tensor([0.5, 0.5]))    # teacher
    q = LOG(torch.tensor([0.25, 0.75]))  # student
    # KL(p||q) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3) = 0.143841
    assert forward_kl(q, p).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # KL(q||p) = .25 ln(.25/.5) + .75 ln(.75/.5) = 0.130812
    assert reverse_kl(q, p).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-5)
    loss, n = kd_loss(logits_of([0.25, 0.75]), logits_of([0.5, 0.5]), ONE, "forward_kl")
    assert n.item() == 1 and loss.item() == pytest.approx(0.143841, rel=1e-4)
    loss, _ = kd_loss(logits_of([0.25, 0.75]), logits_of([0.5, 0.5]), ONE, "reverse_kl")
    assert loss.item() == pytest.approx(0.130812, rel=1e-4)


def test_temperature_softens_both_and_scales_by_t_squared():
    student = torch.tensor([[[0.0, math.log(3.0)]]])   # q = (.25, .75) at T=1
    teacher = torch.zeros(1, 1, 2)                     # p = (.5, .5) at any T
    # T=2: q = softmax(0, ln3/2) = (1/(1+sqrt3), sqrt3/(1+sqrt3)) = (0.366025, 0.633975)
    # KL(p||q) = .5 ln(.5/.366025) + .5 ln(.5/.633975) = 0.037252; x T^2 = 4 -> 0.149009
    loss, _ = kd_loss(student, teacher, ONE, "forward_kl", temperature=2.0)
    assert loss.item() == pytest.approx(0.149009, rel=1e-4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(student, teacher, ONE, temperature=0.0)


def test_jsd_limits_and_bounds():
    q = LOG(torch.tensor([0.25, 0.75]))
    p = LOG(torch.tensor([0.5, 0.5]))
    # TRL convention: beta=0 -> forward KL, beta=1 -> reverse KL exactly
    assert generalized_jsd(q, p, 0.0).item() == pytest.approx(forward_kl(q, p).item())
    assert generalized_jsd(q, p, 1.0).item() == pytest.approx(reverse_kl(q, p).item())
    # continuous limits: JSD_b / b -> KL(p||q) as b -> 0; JSD_b / (1-b) -> KL(q||p) as b -> 1
    b = 1e-3
    assert (generalized_jsd(q, p, b) / b).item() == pytest.approx(forward_kl(q, p).item(), rel=1e-2)
    assert (generalized_jsd(q, p, 1 - b) / b).item() == pytest.approx(reverse_kl(q, p).item(), rel=1e-2)
    # symmetric at 1/2, and bounded by ln 2
    assert generalized_jsd(q, p, 0.5).item() == pytest.approx(generalized_jsd(p, q, 0.5).item(), rel=1e-6)
    # disjoint supports: m = (.5, .5), KL(p||m) = KL(q||m) = ln 2, so JSD_1/2 = ln 2 (0 log 0 = 0, no NaN)
    a, c = LOG(torch.tensor([1.0, 0.0])), LOG(torch.tensor([0.0, 1.0]))
    assert generalized_jsd(a, c, 0.5).item() == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(q, p, 1.5)


@pytest.mark.parametrize("name", sorted(KD_DIVERGENCES))
def test_zero_when_distributions_match(name):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 7)
    mask = torch.ones(2, 3)
    loss, n = kd_loss(z, z.clone(), mask, name, beta=0.3, temperature=1.5)
    assert n.item() == 6 and loss.abs().item() < 1e-5
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(3, dim=-1)
    for mode in ("tail", "renormalise"):
        loss, _ = topk_kd_loss(z, top_ids, top_lp, mask, name, beta=0.3, topk_mode=mode)
        assert loss.abs().item() < 1e-5, mode


def test_topk_tail_and_renormalise_hand_computed():
    student = logits_of([0.1, 0.2, 0.3, 0.4])           # q over V=4
    ids = torch.tensor([[[0, 1]]])                      # teacher top-2: tokens 0 and 1
    t_lp = LOG(torch.tensor([[[0.4, 0.2]]]))            # teacher tail = 1 - .6 = .4
    s, t = topk_buckets_with_tail(student, ids, t_lp)
    assert torch.allclose(s.exp(), torch.tensor([[[0.1, 0.2, 0.7]]]), atol=1e-6)
    assert torch.allclose(t.exp(), torch.tensor([[[0.4, 0.2, 0.4]]]), atol=1e-6)
    # tail: KL(p||q) = .4 ln(.4/.1) + .2 ln(.2/.2) + .4 ln(.4/.7) = .4 ln(16/7) = 0.330671
    loss, _ = topk_kd_loss(student, ids, t_lp, ONE, "forward_kl", topk_mode="tail")
    assert loss.item() == pytest.approx(0.4 * math.log(16 / 7), rel=1e-5)
    # renormalise: p' = (2/3, 1/3), q' = (1/3, 2/3); KL = 2/3 ln 2 + 1/3 ln(1/2) = ln2 / 3 = 0.231049
    s, t = topk_buckets_renormalised(student, ids, t_lp)
    assert torch.allclose(t.exp(), torch.tensor([[[2 / 3, 1 / 3]]]), atol=1e-6)
    loss, _ = topk_kd_loss(student, ids, t_lp, ONE, "forward_kl", topk_mode="renormalise")
    assert loss.item() == pytest.approx(math.log(2) / 3, rel=1e-5)


def test_renormalise_is_blind_to_mass_outside_topk_but_tail_is_not():
    # student keeps teacher's 2:1 ratio on the top-2 but puts 97% of its mass elsewhere
    student = logits_of([0.02, 0.01, 0.97])
    ids = torch.tensor([[[0, 1]]])
    t_lp = LOG(torch.tensor([[[0.6, 0.3]]]))            # tail .1
    renorm, _ = topk_kd_loss(student, ids, t_lp, ONE, topk_mode="renormalise")
    tail, _ = topk_kd_loss(student, ids, t_lp, ONE, topk_mode="tail")
    assert renorm.abs().item() < 1e-6
    # KL((.6,.3,.1) || (.02,.01,.97)) = .6 ln30 + .3 ln30 + .1 ln(.1/.97) = 2.83427
    assert tail.item() == pytest.approx(0.9 * math.log(30) + 0.1 * math.log(0.1 / 0.97), rel=1e-5)


def test_topk_covering_vocab_equals_full_kd_and_grads_finite():
    torch.manual_seed(1)
    zs = torch.randn(1, 2, 5, requires_grad=True)
    zt = torch.randn(1, 2, 5)
    lp, ids = torch.log_softmax(zt, -1).topk(5, dim=-1)
    mask = torch.ones(1, 2)
    full, _ = kd_loss(zs, zt, mask, "reverse_kl")
    topk, _ = topk_kd_loss(zs, ids, lp, mask, "reverse_kl")
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)
    topk.backward()
    assert torch.isfinite(zs.grad).all()


def test_teacher_topk_summing_to_one_keeps_reverse_kl_finite():
    # teacher's top-2 already hold all the mass (rounding can even push it over 1)
    student = logits_of([0.3, 0.3, 0.4]).requires_grad_(True)
    ids = torch.tensor([[[0, 1]]])
    t_lp = LOG(torch.tensor([[[0.5, 0.5000001]]]))
    loss, _ = topk_kd_loss(student, ids, t_lp, ONE, "reverse_kl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_mask_excludes_positions():
    zs = torch.stack([logits_of([0.25, 0.75])[0, 0], torch.tensor([9.0, -9.0])]).view(1, 2, 2)
    zt = torch.zeros(1, 2, 2)
    loss, n = kd_loss(zs, zt, torch.tensor([[1, 0]]))
    # only position 0 counts: .5 ln(4/3)
    assert n.item() == 1 and loss.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-4)


def test_gradient_does_not_reach_teacher():
    zs = torch.randn(1, 1, 3, requires_grad=True)
    zt = torch.randn(1, 1, 3, requires_grad=True)
    kd_loss(zs, zt, ONE, "jsd", beta=0.5)[0].backward()
    assert zt.grad is None and zs.grad is not None


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown KD divergence 'kl'"):
        kd_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), ONE, "kl")
    with pytest.raises(ValueError, match="unknown top-k mode"):
        topk_kd_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1),
                     ONE, topk_mode="x")


def test_forward_kl_gradient_is_q_minus_p_times_t():
    # d/dz_s [T^2 KL(p_T || softmax(z_s / T))] = T (q_T - p_T)
    zs = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    zt = torch.zeros(1, 1, 2)
    for temp in (1.0, 2.0):
        zs.grad = None
        kd_loss(zs, zt, ONE, "forward_kl", temperature=temp)[0].backward()
        q = torch.softmax(zs.detach() / temp, -1)
        assert torch.allclose(zs.grad, temp * (q - 0.5), atol=1e-6)


@pytest.mark.parametrize("mode", ["tail", "renormalise"])
@pytest.mark.parametrize("name", sorted(KD_DIVERGENCES))
def test_topk_gradcheck(mode, name):
    torch.manual_seed(0)
    zs = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(1, 2, 6, dtype=torch.float64), -1).topk(3, dim=-1)

    def f(z):
        s, t = {"tail": topk_buckets_with_tail, "renormalise": topk_buckets_renormalised}[mode](z, ids, lp)
        return KD_DIVERGENCES[name](s, t, 0.3)

    assert torch.autograd.gradcheck(f, (zs,))
