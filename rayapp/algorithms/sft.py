"""Supervised fine-tuning maths: causal-LM token NLL and accuracy as *sums*.

Why sums and not means: a loss is the mean NLL over every labelled token of the global batch,

    L = (sum_r sum_m S_{r,m}) / (sum_r sum_m N_{r,m})

with S the NLL sum and N the token count of micro-batch m on rank r. Per-micro-batch or
per-rank means do not combine to this: mean_r(S_r / N_r) != sum S_r / sum N_r whenever the
ranks hold different numbers of labelled tokens (e.g. S=(2, 9), N=(1, 3): mean of means is
2.5, global mean is 11/4 = 2.75). So callers sum here, all-reduce the token count once per
optimiser step, and divide every micro-batch's sum by that global count before backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayapp.algorithms import IGNORE_INDEX


def _weighted(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return torch.where(m != 0, values * m, torch.zeros_like(values))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(values * mask) over ``dim`` (all dims when None). ``mask`` is bool or float weights;
    masked-out entries count as 0 even when they hold inf/NaN (padding garbage)."""
    prod = _weighted(values, mask)
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over ``dim`` (all dims when None). Where the mask is all
    zero the result is 0, not NaN (numerator 0, denominator clamped to a tiny positive)."""
    m = mask.to(values.dtype)
    prod = _weighted(values, mask)
    num = prod.sum() if dim is None else prod.sum(dim=dim)
    den = m.sum() if dim is None else m.sum(dim=dim)
    return num / den.clamp(min=torch.finfo(values.dtype).tiny)


def _check_lm_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal shift: position t's logits predict token t+1.  -> (B, T-1, V), (B, T-1)"""
    _check_lm_shapes(logits, labels)
    return logits[:, :-1, :], labels[:, 1:]


def _shift_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with unshifted logits: position t holds token t+1, the last IGNORE.  -> (B, T)"""
    _check_lm_shapes(logits, labels)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX (-100) where no loss is taken (prompt,
    padding). With the causal shift, nll = -sum_{b, t: y_{b,t+1} != -100} log softmax(z_{b,t})[y_{b,t+1}].
    Computed in float32 for stability. Returns (loss_sum () float, n_tokens () long).
    """
    # The labels move one step left (IGNORE at the end) instead of the logits one step right: the
    # logits stay contiguous, so no (B, T-1, V) copy is made in forward nor in backward.
    y = _shift_labels(logits, labels)                               # (B, T)
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (y != IGNORE_INDEX).sum()
    return loss_sum, n_tokens


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled next token, and the mask of labelled positions.

    logits (B, T, V), labels (B, T) with -100. log p(y_{t+1} | <= t) = z_t[y_{t+1}] - logsumexp(z_t),
    gathered without materialising a (B, T, V) log-softmax. ``temperature`` T: the log-probs of
    the distribution softmax(z / T) that a sampler at temperature T draws from (RL scores its
    rollouts at the temperature the engine sampled them at). Returns (logps (B, T-1) float32,
    zero where unlabelled; mask (B, T-1) bool).
    """
    if temperature <= 0:
        raise ValueError(f"token_logps: temperature must be > 0 (got {temperature}); greedy decoding has no log-probs to score")
    z, y = _shift(logits, labels)                                   # (B, T-1, V), (B, T-1)
    mask = y != IGNORE_INDEX                                        # (B, T-1)
    z = z.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logps = picked - torch.logsumexp(z, dim=-1)                     # (B, T-1)
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t predicts a response token (labels[t + 1] != IGNORE_INDEX). Its count
    equals :func:`token_nll_sum`'s token count, so per-position sums (KD, features) share the NLL's
    unit."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def next_token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, n): how many labelled next tokens are the argmax of the shifted logits. Both () long."""
    y = _shift_labels(logits, labels)                               # (B, T)
    mask = y != IGNORE_INDEX                                        # (B, T)
    correct = ((logits.argmax(dim=-1) == y) & mask).sum()
    return correct, mask.sum()
