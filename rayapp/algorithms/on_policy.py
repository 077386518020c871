"""On-policy distillation (``kind: distill``, ``method: on_policy``): the per-token reverse-KL
advantage and the policy-gradient loss that follows it.

The student pi_s samples a completion y ~ pi_s(. | x) at temperature T; the teacher pi_t scores
exactly those tokens. For each sampled token y_t (prefix c_t = x, y_<t):

    A_t = -(log pi_s(y_t | c_t) - log pi_t(y_t | c_t)) + w * R            (1)

where R is an optional task reward of the whole completion (``reward_weight`` w; 0 by default).
The first term is a one-sample estimate of the per-token reverse KL, so maximising
E_{y ~ pi_s}[sum_t A_t] with A_t treated as a constant (no gradient through it) is a
policy-gradient step that lowers KL(pi_s || pi_t) along the student's own trajectories
(Agarwal et al. 2024, GKD with beta = 1 on-policy; Lu & Thinking Machines 2025, "On-policy
distillation", which also uses a discount of 0: each token's advantage is its own term, not a
return summed over later tokens; we do the same).

The loss is the PPO clipped surrogate on those advantages, rho_t = exp(log pi_s - log pi_old):
at the first update after sampling rho = 1 and its gradient is -A_t grad log pi_s(y_t), the
REINFORCE form Thinking Machines use (their loss is importance-sampling weighted; clipping only
matters from the second optimizer step on the same samples).

Departures. log pi_s is the trainer's log-prob of the sampled token at the sampling temperature
(logits / T before log_softmax: the distribution the engine sampled from), not the engine's; the
teacher's is at T = 1 (vLLM's prompt log-probs are of the raw logits), so with T != 1 the
student is pulled towards the untempered teacher. No KL to a reference policy: the teacher is
the anchor.

Pure torch: no ray, vllm or transformers.
"""

from __future__ import annotations

import torch

from rayapp.algorithms.sft import masked_mean, token_logps

LOG_RATIO_CLAMP = 20.0  # log(pi / pi_old) is clamped here before exp (as rayapp.algorithms.rl does)


def tempered_token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z_t / T)[y_{t+1}] of each labelled next token: the log-prob of the sampled token
    under the distribution the engine sampled from at temperature T.
    logits (B, T, V), labels (B, T) with -100 -> (logps (B, T-1) float32, mask (B, T-1) bool)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling is stochastic here), got {temperature}")
    z = logits if temperature == 1.0 else logits.float() / temperature
    return token_logps(z, labels)


def reverse_kl_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                          scores: torch.Tensor | None = None, reward_weight: float = 0.0) -> torch.Tensor:
    """Equation (1): A_t = -(student_logp - teacher_logp) + reward_weight * score, on masked tokens,
    0 elsewhere; detached (the advantage is a constant of the policy gradient).

    student_logp, teacher_logp, mask (B, T); scores (B,) task reward per completion or None.
    Returns (B, T) float32."""
    m = mask.to(torch.float32)
    adv = -(student_logp.detach().float() - teacher_logp.detach().float())          # (B, T)
    if reward_weight and scores is not None:
        adv = adv + reward_weight * scores.detach().float().unsqueeze(-1)            # (B, 1) over the tokens
    return adv * m


def reverse_kl_sum(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over masked tokens of (student_logp - teacher_logp): the one-sample (k1) estimate of the
    reverse KL summed over sampled tokens. Divided by the token count it is the per-token reverse
    KL the recipe reports. (B, T) x3 -> () float64, detached."""
    return ((student_logp.detach().double() - teacher_logp.detach().double()) * mask.double()).sum()


def on_policy_distill_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           clip_eps: float = 0.2, normaliser: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate on the reverse-KL advantages, summed over masked tokens and divided by
    ``normaliser`` (the step's token count; the masked token count when None):

        L = sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / normaliser,
        rho_t = exp(logp_t - old_logp_t)

    With logp == old_logp (the first step on fresh samples) dL/dlogp_t = -A_t / normaliser.
    logp, old_logp, advantages, mask (B, T). Returns (loss (), clip_fraction () detached)."""
    m = mask.to(torch.float32)
    log_ratio = logp.float() - old_logp.detach().float()                             # (B, T)
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_CLAMP))
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped) * m
    denom = normaliser if normaliser is not None else m.sum().clamp(min=1.0)
    loss = per_token.sum() / denom
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction
