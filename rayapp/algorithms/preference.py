"""Preference learning: Bradley-Terry reward models and direct preference optimisation.

Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r), so the negative log-likelihood of the
human choice is -log sigmoid(r_c - r_r) (Ouyang et al. 2022, the reward-model loss).

DPO (Rafailov et al. 2023): with the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)),
Bradley-Terry gives

    L = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])

and with label smoothing eps (conservative DPO, Mitchell 2023: the label is flipped with
probability eps) L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h).

Both losses are means over pairs: each pair counts once whatever its length, so equal-sized
micro-batches combine by averaging; for a short last micro-batch scale by its share of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayapp.algorithms.sft import token_logps


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(-log sigmoid(r_c - r_r)) and the accuracy mean(r_c > r_r). (B,), (B,) -> (), ()."""
    margin = r_chosen.float() - r_rejected.float()                  # (B,)
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float().mean()
    return loss, accuracy


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Summed log-probabilities of each row's labelled tokens (causal shift). (B, T, V), (B, T) -> (B,).

    ``average=True`` divides by each row's labelled-token count (length-normalised, as in SimPO /
    IPO variants); rows with no labelled token give 0.
    """
    logps, mask = token_logps(logits, labels)                       # (B, T-1), (B, T-1)
    total = logps.sum(dim=-1)                                       # (B,)
    return total / mask.sum(dim=-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (mean over pairs) and the implicit rewards beta * (log pi - log ref), detached.

    All inputs (B,) sequence log-probs (``sequence_logps``); the reference ones are detached.
    Returns (loss (), chosen_rewards (B,), rejected_rewards (B,)). reward accuracy is
    mean(chosen_rewards > rejected_rewards).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = policy_chosen_logps.float() - reference_chosen_logps.detach().float()        # (B,)
    rejected = policy_rejected_logps.float() - reference_rejected_logps.detach().float()  # (B,)
    h = beta * (chosen - rejected)                                                         # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses.mean(), (beta * chosen).detach(), (beta * rejected).detach()

