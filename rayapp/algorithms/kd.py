"""Response-based knowledge distillation: token-level divergences between the teacher's and the
student's next-token distributions (Hinton et al. 2015; GKD, Agarwal et al. 2024).

Notation per position: p = teacher distribution, q = student distribution over the vocabulary.

    forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)     mass-covering (classic KD)
    reverse KL   KL(q || p) = sum_v q_v (log q_v - log p_v)     mode-seeking (on-policy GKD)
    JSD_beta     m = beta p + (1 - beta) q
                 JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)

``beta`` follows TRL's GKD convention: beta = 0 is forward KL, beta = 1 is reverse KL, anything
in between the generalised JSD. Note the special cases are not the continuous limits of the
formula: JSD_beta ~ beta * KL(p || q) as beta -> 0 and ~ (1 - beta) * KL(q || p) as beta -> 1
(first-order expansion of KL(q || m) around m = q gives O(beta^2)), so the scale jumps there;
TRL does the same. JSD_{1/2} is the symmetric Jensen-Shannon divergence, bounded by log 2.

Temperature: both distributions are softened as softmax(z / T) and the loss is multiplied by
T^2, since d/dz of the softened loss scales as 1/T^2 (Hinton et al.); the gradient magnitude
then stays comparable when T changes.

Losses return (loss_sum, n_tokens) like ``sft.token_nll_sum``: divide by the global count of
distilled tokens (see the module docstring of ``sft`` for why sums). Inputs are aligned per
position: row t of student logits, teacher logits and teacher top-k all describe the same
next token; ``mask`` (B, T) marks the positions that carry loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0 * log 0 = 0 (no NaN where
    p is exactly zero, in value or gradient).  (..., K) -> (...)"""
    p = log_p.exp()
    nz = p > 0
    lp = torch.where(nz, log_p, torch.zeros_like(log_p))
    lq = torch.where(nz, log_q, torch.zeros_like(log_q))
    return (p * (lp - lq)).sum(dim=-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """KL(teacher || student) per position. (..., V), (..., V) -> (...). ``beta`` is unused."""
    return _kl_from_logs(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per position. (..., V), (..., V) -> (...). ``beta`` is unused."""
    return _kl_from_logs(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, per position.

    beta = 0 -> forward KL(p || q), beta = 1 -> reverse KL(q || p) (TRL GKD convention, see the
    module docstring). log m is computed with logsumexp, never by exponentiating. (..., V) -> (...)
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    log_m = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                         student_logp + math.log(1.0 - beta)]), dim=0)   # (..., V)
    return beta * _kl_from_logs(teacher_logp, log_m) + (1.0 - beta) * _kl_from_logs(student_logp, log_m)


KD_DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


def _divergence(name: str):
    if name not in KD_DIVERGENCES:
        raise ValueError(f"unknown KD divergence '{name}'; expected one of {sorted(KD_DIVERGENCES)}")
    return KD_DIVERGENCES[name]


def _masked_total(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.bool()                                                  # (B, T)
    return torch.where(m, per_token, torch.zeros_like(per_token)).sum(), m.sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary KD: T^2 * D(softmax(z_t / T), softmax(z_s / T)) summed over masked positions.

    student_logits, teacher_logits (B, T, V); mask (B, T). The teacher is detached.
    Returns (loss_sum (), n_tokens ()). Computed in float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)             # (B, T, V)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)    # (B, T, V)
    per_token = _divergence(divergence)(s, t, beta) * temperature ** 2          # (B, T)
    return _masked_total(per_token, mask)


# --- teacher top-k logprobs (what vLLM returns) ----------------------------------------------
#
# vLLM gives, per position, the teacher's K most likely token ids and their log-probabilities,
# not the full distribution. Two ways to compare the student with that:
#
# "tail" (default): K + 1 buckets, the K tokens plus one 'tail' bucket for everything else,
#   holding 1 - sum_k p_k for the teacher and 1 - sum_k q_k for the student (the student's tail
#   is a logsumexp over its non-top-k logits, so it is exact and stable). Both are then proper
#   distributions over the same K + 1 outcomes: the pushforward of p and q under the map
#   token -> bucket. So the result is a true divergence (>= 0, zero iff the bucketed
#   distributions agree) and, by the data-processing inequality, a lower bound on the
#   full-vocabulary divergence. The student is penalised for mass it moves outside the
#   teacher's top-k.
# "renormalise": both restricted to the K tokens and renormalised there. This compares the
#   conditionals given "the token is in the teacher's top-k"; it is blind to how much mass the
#   student puts outside the set (a student with 99% of its mass elsewhere can score 0), which
#   is why "tail" is the default. It can be the better choice when K covers nearly all of p.
#
# Temperature: the student's logits are divided by T and the loss multiplied by T^2. The teacher
# log-probs are used as given, so request them at the same temperature (vLLM:
# logprobs_mode="processed_logprobs" with sampling temperature T), or use T = 1. Top-k ids must
# be distinct (vLLM may append the sampled token as a (K+1)-th entry when it is not in the
# top-k; drop or keep it consistently, the maths only needs distinct ids).

TAIL_FLOOR = 1e-6


def topk_buckets_with_tail(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                           teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs over K + 1 buckets for student and teacher.

    student_logits (B, T, V) (already temperature-scaled), teacher_ids (B, T, K) long,
    teacher_logprobs (B, T, K). Returns (student_logp, teacher_logp), each (B, T, K + 1); when
    K = V there is no tail and both are (B, T, K).
    """
    log_z = torch.logsumexp(student_logits, dim=-1, keepdim=True)                 # (B, T, 1)
    s_top = student_logits.gather(-1, teacher_ids) - log_z                        # (B, T, K)
    t_top = teacher_logprobs                                                      # (B, T, K)
    if teacher_ids.size(-1) >= student_logits.size(-1):
        return s_top, t_top
    rest = student_logits.scatter(-1, teacher_ids, float("-inf"))                 # (B, T, V)
    s_tail = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z                  # (B, T, 1)
    t_mass = t_top.exp().sum(dim=-1, keepdim=True)                                # (B, T, 1)
    # Floor the teacher's tail at TAIL_FLOOR and renormalise: returned top-k log-probs can sum to
    # >= 1 by rounding, and a zero tail would make reverse KL infinite for any student.
    t_tail = torch.log((1.0 - t_mass).clamp(min=TAIL_FLOOR))                      # (B, T, 1)
    t = torch.cat([t_top, t_tail], dim=-1)                                        # (B, T, K + 1)
    return torch.cat([s_top, s_tail], dim=-1), t - torch.logsumexp(t, dim=-1, keepdim=True)


def topk_buckets_renormalised(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                              teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs over the teacher's K tokens, each side renormalised to sum to 1 there.
    (B, T, V), (B, T, K), (B, T, K) -> (B, T, K), (B, T, K)."""
    s_top = student_logits.gather(-1, teacher_ids)                                # (B, T, K)
    return (s_top - torch.logsumexp(s_top, dim=-1, keepdim=True),
            teacher_logprobs - torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True))


TOPK_MODES = {"tail": topk_buckets_with_tail, "renormalise": topk_buckets_renormalised}


def topk_kd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 mask: torch.Tensor, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, topk_mode: str = "tail") -> tuple[torch.Tensor, torch.Tensor]:
    """KD against teacher top-k log-probs: T^2 * D over the buckets of ``topk_mode``.

    student_logits (B, T, V); teacher_ids (B, T, K) long; teacher_logprobs (B, T, K); mask (B, T).
    Returns (loss_sum (), n_tokens ()). See the comment above for the two modes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk_mode not in TOPK_MODES:
        raise ValueError(f"unknown top-k mode '{topk_mode}'; expected one of {sorted(TOPK_MODES)}")
    s, t = TOPK_MODES[topk_mode](student_logits.float() / temperature, teacher_ids.long(),
                                 teacher_logprobs.detach().float())
    per_token = _divergence(divergence)(s, t, beta) * temperature ** 2           # (B, T)
    return _masked_total(per_token, mask)
