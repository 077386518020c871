"""Feature-based distillation: match the student's hidden states to the teacher's at chosen
layer pairs (FitNets, Romero et al. 2015; TinyBERT's uniform layer map, Jiao et al. 2020).

When the widths differ, a learned linear map W_l: R^{H_s} -> R^{H_t} per layer pair carries the
student's hidden state into the teacher's space (FitNets' regressor), trained jointly with the
student and thrown away after training. Per token, with s = W_l h_s and t = h_t:

    mse     (1 / H_t) * sum_j (s_j - t_j)^2           (mean over the hidden dims, so the scale
                                                       does not grow with the teacher's width)
    cosine  1 - <s, t> / (|s| |t|)                     (ignores the norm, only the direction)

Losses return (loss_sum, n_tokens) like the other token losses in this package. Hidden-state
indices follow Hugging Face ``output_hidden_states``: 0 is the embedding output, L the last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureProjector(nn.Module):
    """One map per (student layer, teacher layer) pair: ``nn.Linear(H_s, H_t)`` when the widths
    differ, ``nn.Identity`` when they are equal (no parameters, nothing to learn)."""

    def __init__(self, student_width: int, teacher_width: int, num_pairs: int, bias: bool = False):
        super().__init__()
        self.student_width, self.teacher_width = student_width, teacher_width
        make = (lambda: nn.Identity()) if student_width == teacher_width else (
            lambda: nn.Linear(student_width, teacher_width, bias=bias))
        self.maps = nn.ModuleList(make() for _ in range(num_pairs))

    def forward(self, student_hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(B, T, H_s)] * num_pairs -> [(B, T, H_t)] * num_pairs"""
        if len(student_hiddens) != len(self.maps):
            raise ValueError(f"expected {len(self.maps)} hidden states, got {len(student_hiddens)}")
        return [m(h) for m, h in zip(self.maps, student_hiddens, strict=True)]


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int,
                      include_embeddings: bool = False) -> list[tuple[int, int]]:
    """Student layer i (1..M) -> teacher layer max(1, floor(i * N / M)), TinyBERT's uniform
    strategy: the last layers always pair up. Indices are into ``hidden_states`` (0 = embeddings).

    >>> uniform_layer_map(2, 6)
    [(1, 3), (2, 6)]
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {num_student_layers} and {num_teacher_layers}")
    pairs = [(i, max(1, i * num_teacher_layers // num_student_layers))
             for i in range(1, num_student_layers + 1)]
    return [(0, 0)] + pairs if include_embeddings else pairs


def mse_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T, H) -> (B, T): mean over H of squared differences."""
    return (student - teacher).pow(2).mean(dim=-1)


def cosine_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T, H) -> (B, T): 1 - cosine similarity (0 when parallel, 2 when opposite)."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


FEATURE_LOSSES = {"mse": mse_per_token, "cosine": cosine_per_token}


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                 kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over masked tokens of the per-token ``kind`` loss, and the token count.

    student_hidden (B, T, H) already projected to the teacher's width, teacher_hidden (B, T, H)
    (detached here), mask (B, T). Returns (loss_sum (), n_tokens ()). Computed in float32.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss '{kind}'; expected one of {sorted(FEATURE_LOSSES)}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} "
                         "hidden states differ in shape; project the student first (FeatureProjector)")
    per_token = FEATURE_LOSSES[kind](student_hidden.float(), teacher_hidden.detach().float())   # (B, T)
    m = mask.bool()
    return torch.where(m, per_token, torch.zeros_like(per_token)).sum(), m.sum()


def layer_pairs_feature_loss(student_hiddens, teacher_hiddens, layer_map: list[tuple[int, int]],
                             projector: FeatureProjector, mask: torch.Tensor, kind: str = "mse"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over layer pairs of ``feature_loss``: (sum_pairs loss_sum / P, n_tokens).

    student_hiddens / teacher_hiddens: the ``hidden_states`` tuples, each entry (B, T, H).
    """
    projected = projector([student_hiddens[s] for s, _ in layer_map])   # [(B, T, H_t)] * P
    total, n = None, None
    for h, (_, t) in zip(projected, layer_map, strict=True):
        loss_sum, n = feature_loss(h, teacher_hiddens[t], mask, kind)
        total = loss_sum if total is None else total + loss_sum
    return total / len(layer_map), n
