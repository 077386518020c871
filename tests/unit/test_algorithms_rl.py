import math

import pytest
import torch

from rayapp.algorithms.rl import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    ppo_policy_loss,
    value_loss,
    whiten,
)

T = torch.tensor


def test_gae_monte_carlo_when_gamma_lam_one():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    # A_t = (sum of future rewards) - V_t = 1 - V; R = 1
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert torch.allclose(adv, T([[0.5, 0.4, 0.3]])) and torch.allclose(ret, T([[1.0, 1.0, 1.0]]))


def test_gae_hand_computed_with_padding():
    r, v = T([[0.0, 0.0, 1.0, 0.0]]), T([[0.5, 0.6, 0.7, 5.0]])
    m = T([[1, 1, 1, 0]])                                  # last position is padding (value 5 ignored)
    # gamma .9 lam .5: delta2 = 1 - .7 = .3; delta1 = .9*.7 - .6 = .03; delta0 = .9*.6 - .5 = .04
    # A2 = .3; A1 = .03 + .45*.3 = .165; A0 = .04 + .45*.165 = .11425
    adv, ret = gae(r, v, m, 0.9, 0.5)
    assert torch.allclose(adv, T([[0.11425, 0.165, 0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, T([[0.61425, 0.765, 1.0, 0.0]]), atol=1e-6)


def test_gae_skips_interior_masked_tokens():
    r, v, m = T([[0.0, 7.0, 1.0]]), T([[0.5, 9.0, 0.7]]), T([[1, 0, 1]])
    # t1 is an observation token: skipped. A2 = 1 - .7 = .3; t0: delta = .7 - .5 = .2, A0 = .2 + .3 = .5
    adv, _ = gae(r, v, m, 1.0, 1.0)
    assert torch.allclose(adv, T([[0.5, 0.0, 0.3]]), atol=1e-6)


def test_grpo_advantages():
    rewards = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean .5, unbiased std sqrt(4 * .25 / 3) = 0.57735 -> +-.5 / 0.57735 = +-0.866025
    # group 2: identical rewards -> 0, not NaN
    adv = grpo_advantages(rewards, 4, eps=0.0 + 1e-6)
    s = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, T([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-5)
    assert torch.isfinite(grpo_advantages(T([3.0, 3.0]), 2)).all()
    assert torch.allclose(grpo_advantages(rewards, 4, scale_by_std=False), T([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        grpo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="with group_size 3"):
        grpo_advantages(rewards, 3)


def test_advantage_registry():
    r, m = T([[0.0, 1.0], [0.0, 0.0]]), T([[1, 1], [1, 0]])
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"](r, m, group_size=2)
    # scores (1, 0): mean .5, std sqrt(.5) -> +-0.7071, broadcast over each row's response tokens
    a = 0.5 / math.sqrt(0.5)
    assert torch.allclose(adv, T([[a, a], [-a, 0.0]]), atol=1e-5) and adv is ret
    adv, _ = ADVANTAGE_ESTIMATORS["gae"](r, m, values=torch.zeros(2, 2), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, T([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="GAE needs critic values"):
        ADVANTAGE_ESTIMATORS["gae"](r, m)


def test_whiten():
    # mean 2, population var 2/3 -> (x - 2) / sqrt(2/3) = (-1.224745, 0, 1.224745)
    out = whiten(T([1.0, 2.0, 3.0]))
    assert torch.allclose(out, T([-1.224745, 0.0, 1.224745]), atol=1e-5)
    out = whiten(T([1.0, 2.0, 3.0, 100.0]), T([1, 1, 1, 0]))
    assert torch.allclose(out, T([-1.224745, 0.0, 1.224745, 0.0]), atol=1e-5)
    assert torch.allclose(whiten(T([1.0, 3.0]), shift_mean=False), T([1.0, 3.0]), atol=1e-5)  # (x-2)/1 + 2


def test_ppo_policy_loss_hand_computed():
    ratio = T([[1.5, 0.5, 0.5, 1.5]])
    adv = T([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratio).requires_grad_(True)
    # eps .2:  tok0 max(-1.5, -1.2) = -1.2 clipped;  tok1 max(-.5, -.8) = -.5
    #          tok2 max(.5, .8) = .8 clipped;        tok3 max(1.5, 1.2) = 1.5
    # mean (-1.2 - .5 + .8 + 1.5) / 4 = .15; clip fraction 2/4
    loss, cf, kl = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), 0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6) and cf.item() == 0.5
    # approx_kl = .5 * mean(log r ^2) = .5 * (2 ln1.5^2 + 2 ln.5^2) / 4 = 0.161214
    assert kl.item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2), rel=1e-5)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 where unclipped: tok1 -.125, tok3 +.375; clipped tokens 0
    assert torch.allclose(logp.grad, T([[0.0, -0.125, 0.0, 0.375]]), atol=1e-6)


def test_ppo_clip_exactly_at_boundaries():
    eps = 0.25   # 1 +- eps exactly representable, exp(log(1.25)) == 1.25 in float32
    ratio = T([[1.25, 0.75, 1.25 + 1e-3, 0.75 - 1e-3]])
    adv = T([[1.0, -1.0, 1.0, -1.0]])
    logp = torch.log(ratio).requires_grad_(True)
    assert torch.exp(logp.detach())[0, :2].tolist() == [1.25, 0.75]
    loss, cf, _ = ppo_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), eps)
    # on the boundary nothing is clipped and the gradient is the unclipped -A r / 4;
    # just past it, clipping is active and the gradient is 0
    assert cf.item() == 0.5
    loss.backward()
    assert torch.allclose(logp.grad, T([[-1.25 / 4, 0.75 / 4, 0.0, 0.0]]), atol=1e-6)


def test_ppo_normaliser_combines_to_global_mean():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    full, _, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(ppo_policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2,
                                normaliser=n)[0] for i in range(4))
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_grpo_policy_loss_adds_k3():
    logp = T([[math.log(0.5)]])
    ref = T([[math.log(0.25)]])
    # ratio 1 (old == logp): surrogate = -A = -1; k3 = (.5 - 1) + ln2 = 0.193147; + .1 * k3
    loss, _, _ = POLICY_LOSSES["grpo"](logp, logp, T([[1.0]]), torch.ones(1, 1), 0.2, ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * (math.log(2) - 0.5), rel=1e-6)
    ppo, _, _ = POLICY_LOSSES["ppo"](logp, logp, T([[1.0]]), torch.ones(1, 1), 0.2, ref_logp=ref, kl_coef=0.1)
    assert ppo.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="needs ref_logp"):
        POLICY_LOSSES["grpo"](logp, logp, T([[1.0]]), torch.ones(1, 1), 0.2, kl_coef=0.1)


def test_value_loss_hand_computed():
    v, old, ret = T([[1.0, 2.0]]), T([[0.5, 2.0]]), T([[2.0, 0.0]])
    # tok0: v_clip = .5 + clip(.5, +-.2) = .7; max((1-2)^2, (.7-2)^2) = 1.69 (clipped)
    # tok1: v_clip = 2; (2-0)^2 = 4. loss = .5 * (1.69 + 4) / 2 = 1.4225
    loss, cf = value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(1.4225, rel=1e-6) and cf.item() == 0.5
    loss, _ = value_loss(v, old, ret, torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2)


def test_kl_estimators_values_and_unbiasedness():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    # log r = ln(.25/.5) = -ln2: k1 = ln2, k2 = .5 ln2^2, k3 = (.5 - 1) + ln2
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-6)
    assert kl_k3(logp, ref).item() == pytest.approx(math.log(2) - 0.5, rel=1e-6)
    # expectation under p = (.5, .5) against ref = (.25, .75): KL(p||ref) = .5 ln(4/3) for k1 and k3
    p, q = T([0.5, 0.5]), T([0.25, 0.75])
    true_kl = 0.5 * math.log(4 / 3)
    for name in ("k1", "k3"):
        est = (p * KL_ESTIMATORS[name](p.log(), q.log())).sum().item()
        assert est == pytest.approx(true_kl, rel=1e-5), name
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()
    assert torch.isfinite(kl_k3(T([-500.0]), T([0.0]))).all()


def test_entropy():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4), rel=1e-6)
    # p = (.25, .75): H = -(.25 ln .25 + .75 ln .75) = 0.562335
    h = entropy_from_logits(T([[0.0, math.log(3)]]))
    assert h.shape == (1,) and h.item() == pytest.approx(0.562335, rel=1e-5)


def test_kl_penalized_rewards():
    scores = T([1.0, 2.0])
    logp = T([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    ref = T([[-1.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    mask = T([[1, 1, 0], [0, 0, 0]])
    # row0: k1 = (.5, -.5) -> -.1 * k1 = (-.05, .05); score on the last response token (t=1)
    # row1: no response token -> all zeros, the score goes nowhere
    out = kl_penalized_rewards(scores, logp, ref, mask, 0.1)
    assert torch.allclose(out, T([[-0.05, 1.05, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)


def test_every_algorithm_is_made_of_registry_entries():
    """The RL recipe looks each part of `algorithm:` up in these registries."""
    from rayapp.algorithms.rl import ALGORITHMS
    from rayapp.config.rl import RLHFJobConfig

    assert set(ALGORITHMS) == set(RLHFJobConfig.model_fields["algorithm"].annotation.__args__)
    for algo in ALGORITHMS.values():
        assert algo.advantage in ADVANTAGE_ESTIMATORS and algo.policy_loss in POLICY_LOSSES and algo.kl in KL_ESTIMATORS
        assert algo.kl_in in ("reward", "loss")
    assert ALGORITHMS["ppo"].critic and not ALGORITHMS["grpo"].critic  # GAE needs values; group advantages do not
