"""Policy-gradient RL for LLMs: advantages (GAE, GRPO), the PPO clipped objective, value loss,
KL estimators and entropy. Token tensors are (B, T) over response tokens, with ``mask`` (B, T)
marking the tokens the policy generated (prompt, padding and tool/observation tokens are 0).

Aggregation: losses are masked token means by default. Pass ``normaliser`` (the number of
response tokens in the whole optimiser step, all-reduced over workers) to get
masked_sum / normaliser instead, which sums to the global token mean across micro-batches and
ranks (per-micro-batch means do not; see ``sft``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayapp.algorithms.sft import masked_mean

LOG_RATIO_CLAMP = 20.0  # the PPO ratio's log is clamped here (above) before exp, so it cannot overflow
KL_LOG_RATIO_CLAMP = 10.0  # k3's log(p_ref / p) is clamped to +-10 (as verl does): exp(10) - 11 ~ 2.2e4 at most


def _agg(per_token: torch.Tensor, mask: torch.Tensor, normaliser=None) -> torch.Tensor:
    if normaliser is None:
        return masked_mean(per_token, mask)
    return (per_token * mask.to(per_token.dtype)).sum() / normaliser


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (population) variance over the masked entries.
    ``shift_mean=False`` keeps the mean (only rescales). Masked-out entries come back as 0.
    Any shape; mask the same shape (all ones when None)."""
    mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), computed right to left:

        delta_t = r_t + gamma * V_{t'} - V_t          (t' the next masked-in position; V = 0 past the end)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t                            (the value target)

    Masked-out positions are skipped: they carry the next value and advantage through unchanged
    (as verl does), so interior observation tokens do not break the recursion, and they get
    A = R = 0. rewards, values, mask (B, T) -> advantages (B, T), returns (B, T). No gradient.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        next_value = torch.zeros_like(values[:, 0])                   # (B,)
        last_adv = torch.zeros_like(values[:, 0])                     # (B,)
        adv = torch.zeros_like(values)                                # (B, T)
        for t in reversed(range(values.size(1))):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            a = delta + gamma * lam * last_adv
            adv[:, t] = a * m[:, t]
            next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
            last_adv = torch.where(m[:, t] > 0, a, last_adv)
        returns = (adv + values) * m
    return adv, returns


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps)
    over the G samples of the same prompt, std unbiased as in the reference implementations.

    rewards (N * G,) laid out prompt by prompt ([p0s0, p0s1, ..., p1s0, ...]) -> (N * G,).
    A group whose rewards are all equal gets zeros (0 / (0 + eps)), never NaN.
    ``scale_by_std=False`` is Dr. GRPO (Liu et al. 2025): subtract the mean only.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N * group_size,); got shape {tuple(rewards.shape)} "
                         f"with group_size {group_size}")
    with torch.no_grad():
        g = rewards.float().view(-1, group_size)                       # (N, G)
        centred = g - g.mean(dim=1, keepdim=True)
        if scale_by_std:
            centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def gae_estimator(rewards, mask, *, values=None, gamma=1.0, lam=1.0, **_):
    """Registry adapter: token rewards (B, T) and critic values -> (advantages, returns) (B, T)."""
    if values is None:
        raise ValueError("GAE needs critic values; use the 'grpo' estimator for critic-free training")
    return gae(rewards, values, mask, gamma, lam)


def grpo_estimator(rewards, mask, *, group_size=None, eps=1e-6, scale_by_std=True, **_):
    """Registry adapter: outcome reward = sum of each row's token rewards (B,), group-normalised
    and broadcast to every response token. Returns (advantages, returns) (B, T), returns == advantages."""
    scores = (rewards * mask.to(rewards.dtype)).sum(dim=-1)            # (B,)
    adv = grpo_advantages(scores, group_size, eps, scale_by_std)       # (B,)
    adv = adv.unsqueeze(-1) * mask.to(adv.dtype)                       # (B, T)
    return adv, adv


ADVANTAGE_ESTIMATORS = {"gae": gae_estimator, "grpo": grpo_estimator}


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log p_ref(x): unbiased for KL(p || p_ref) with x ~ p, high variance, can be < 0."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2 with r = p_ref / p: biased, low variance, >= 0 (Schulman 2020)."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = p_ref / p: unbiased (E_p[r] = 1) and >= 0 (log r <= r - 1); the
    GRPO KL term. log r is clamped to +-10 first, as verl does: unclamped, one token the policy has
    pushed far below the reference (log r = 15) gives k3 = 3.3e6 and swamps the loss; clamped it
    gives exp(10) - 11 = 2.2e4, and the gradient past the clamp is 0."""
    log_r = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return torch.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"; verl's and TRL's TIS): the rollouts were sampled by the engine's
    q (vLLM), not the trainer's pi_old, and the two differ (kernels, precision, a weight sync that
    lost something), so each token's loss is weighted by

        w_t = min(pi_old(y_t) / q(y_t), cap) = min(exp(old_logp - rollout_logp), cap)

    detached (a constant per token). Truncating at ``cap`` bounds the variance at the cost of a
    little bias. old_logp, rollout_logp, mask (B, T) -> w (B, T), 0 where mask is 0."""
    with torch.no_grad():
        log_w = (old_logp.float() - rollout_logp.float()).clamp(max=LOG_RATIO_CLAMP)
        return torch.exp(log_w).clamp(max=cap) * mask.to(torch.float32)


def mismatch_kl(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(q || pi) between the engine's sampling distribution q and the trainer's pi, estimated on
    the tokens q sampled with k3: r = pi / q, k3 = r - 1 - log r (>= 0, unbiased since E_q[r] = 1).
    Returns the token sum (); divide by mask.sum() for the mean. (B, T) inputs."""
    with torch.no_grad():
        log_r = (trainer_logp.float() - rollout_logp.float()).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        return ((torch.expm1(log_r) - log_r).clamp(min=0.0) * mask.to(torch.float32)).sum()  # expm1: exact near 0


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v. (..., V) -> (...), in float32."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, kl=kl_k1) -> torch.Tensor:
    """Per-token PPO rewards (Ziegler et al. 2019; InstructGPT): -kl_coef * kl on every response
    token (``kl`` a KL_ESTIMATORS entry, k1 as in InstructGPT), plus the sequence score on the last
    one. scores (B,), logp/ref_logp/mask (B, T) -> (B, T)."""
    m = mask.to(logp.dtype)
    rewards = -kl_coef * kl(logp.detach(), ref_logp.detach()) * m        # (B, T)
    positions = torch.arange(m.size(1), device=m.device).expand_as(m)
    last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    has = last >= 0
    rows = torch.arange(m.size(0), device=m.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float, ref_logp: torch.Tensor | None = None,
                    kl_coef: float = 0.0, normaliser=None, kl=kl_k3, is_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), per token with rho = exp(logp - old_logp):

        L = mean_t w_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    with w_t the truncated importance weights of the engine's samples (``is_weights``,
    :func:`truncated_is_weights`; 1 when None), applied to the clipped term as verl does.

    Clipping is active where the clipped term is strictly larger, i.e. rho > 1 + eps with A > 0
    or rho < 1 - eps with A < 0; there the gradient is 0. At exactly 1 +- eps nothing is clipped.
    In RLHF-PPO the KL to the reference goes into the rewards (``kl_penalized_rewards``), so
    ``ref_logp`` / ``kl_coef`` / ``kl`` are ignored here (they are in the signature so POLICY_LOSSES
    entries are interchangeable).

    logp, old_logp, advantages, mask (B, T). Returns (loss (), clip_fraction (), approx_kl ()),
    the last two detached; approx_kl = mean 0.5 (logp - old_logp)^2 (k2 of the update).
    """
    log_ratio = logp.float() - old_logp.detach().float()              # (B, T)
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_CLAMP))
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()
    loss = _agg(per_token, mask, normaliser)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_eps: float, ref_logp: torch.Tensor | None = None,
                     kl_coef: float = 0.0, normaliser=None, kl=kl_k3, is_weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO objective: the PPO clipped surrogate plus kl_coef * kl(logp, ref_logp) in the loss
    (DeepSeekMath puts the KL in the loss, not the reward, estimated with k3; ``kl`` is a
    KL_ESTIMATORS entry). Token-mean aggregation over the
    batch (DAPO's choice; the paper averages per sequence first). ``is_weights`` weight the
    surrogate only, not the KL term (as verl). Same shapes and returns as ``ppo_policy_loss``."""
    loss, clip_fraction, approx_kl = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps,
                                                     normaliser=normaliser, is_weights=is_weights)
    if kl_coef:
        if ref_logp is None:
            raise ValueError("grpo_policy_loss: kl_coef > 0 needs ref_logp")
        loss = loss + kl_coef * _agg(kl(logp.float(), ref_logp.detach().float()), mask, normaliser)
    return loss, clip_fraction, approx_kl


POLICY_LOSSES = {"ppo": ppo_policy_loss, "grpo": grpo_policy_loss}


@dataclass(frozen=True)
class RLAlgorithm:
    """An RL algorithm as entries of the registries above: what the RL recipe reads."""

    advantage: str    # ADVANTAGE_ESTIMATORS key
    policy_loss: str  # POLICY_LOSSES key
    kl: str           # KL_ESTIMATORS key of the KL-to-reference term
    kl_in: str        # where that term goes: "reward" (per token, before the advantages) or "loss"
    critic: bool      # a value head trained with value_loss, whose values the advantage estimator uses


ALGORITHMS = {
    # InstructGPT-style PPO: -kl_coef * k1 in the token rewards, GAE on a learned critic.
    "ppo": RLAlgorithm(advantage="gae", policy_loss="ppo", kl="k1", kl_in="reward", critic=True),
    # DeepSeekMath GRPO: group-normalised outcome rewards, kl_coef * k3 in the loss, no critic.
    "grpo": RLAlgorithm(advantage="grpo", policy_loss="grpo", kl="k3", kl_in="loss", critic=False),
}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None = None, normaliser=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic loss 0.5 * mean max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-clip)
    (PPO2's value clipping); ``clip=None`` is the plain 0.5 (V - R)^2.
    values, old_values, returns, mask (B, T) -> (loss (), clip_fraction () detached)."""
    v = values.float()
    r = returns.detach().float()
    err = (v - r) ** 2
    if clip is None:
        return 0.5 * _agg(err, mask, normaliser), torch.zeros((), device=v.device)
    old = old_values.detach().float()
    v_clip = old + torch.clamp(v - old, -clip, clip)
    err_clip = (v_clip - r) ** 2
    loss = 0.5 * _agg(torch.maximum(err, err_clip), mask, normaliser)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clip > err).float(), mask)
    return loss, clip_fraction
