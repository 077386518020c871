"""Relation-based distillation: match how the student arranges a batch of examples, not the
examples' coordinates, so student and teacher widths may differ without a projector.

Each loss takes pooled representations, student (N, H_s) and teacher (N, H_t) over the same N
examples (``masked_mean_pool`` turns (B, T, H) hidden states into (B, H)), and the teacher is
detached.

* RKD distance (Park et al. 2019): psi_ij = ||x_i - x_j|| / mu, mu the mean distance over the
  pairs i < j; loss = mean_{i<j} huber(psi^s_ij - psi^t_ij). Dividing by mu makes psi invariant to
  scaling (and translating) the representations, so only the shape of the point cloud matters.
  Park's code averages over the full N x N matrix, diagonal included; we average over the
  N(N-1)/2 distinct pairs, which only rescales the loss.
* RKD angle: cos of the angle at vertex a of the triangle (a, b, c),
  <(x_b - x_a)/|x_b - x_a|, (x_c - x_a)/|x_c - x_a|>, matched with the Huber loss, averaged over
  ordered triplets of distinct indices (Park averages over all N^3, degenerate ones included).
  Invariant to scale, translation and rotation.
* Similarity-preserving (Tung & Mori 2019): G = X X^T (N, N), each row divided by its L2 norm;
  loss = ||G~_s - G~_t||_F^2 / N^2. Invariant to scaling X.

Huber is torch's smooth_l1 with delta 1: 0.5 x^2 for |x| < 1, |x| - 0.5 otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the masked tokens of each row. (B, T, H), (B, T) -> (B, H).
    A row with an empty mask pools to zeros."""
    m = mask.to(hidden.dtype).unsqueeze(-1)                              # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)         # (B, H)


def _check(student: torch.Tensor, teacher: torch.Tensor, min_n: int, what: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.size(0) != teacher.size(0):
        raise ValueError(f"{what}: expected student (N, H_s) and teacher (N, H_t) with the same N; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.size(0) < min_n:
        raise ValueError(f"{what} needs at least {min_n} examples per batch, got {student.size(0)}; "
                         "raise the micro-batch size")


def _pair_distances(x: torch.Tensor) -> torch.Tensor:
    """Distances over pairs i < j. (N, H) -> (N(N-1)/2,). Clamped before sqrt so the gradient at
    coincident points stays finite."""
    n = x.size(0)
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    diff = x[iu[0]] - x[iu[1]]                                           # (P, H)
    return diff.pow(2).sum(-1).clamp(min=1e-12).sqrt()                   # (P,)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss. (N, H_s), (N, H_t) -> (). See the module docstring."""
    _check(student, teacher, 2, "RKD distance loss")
    with torch.no_grad():
        d_t = _pair_distances(teacher.float())                           # (P,)
        d_t = d_t / d_t.mean()
    d_s = _pair_distances(student.float())                               # (P,)
    d_s = d_s / d_s.mean()
    return F.smooth_l1_loss(d_s, d_t, reduction="mean")


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex a for (a, b, c): (N, H) -> (N, N, N) with [a, b, c]."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1)        # (N, N, H): e[a, b] ~ x_b - x_a
    return torch.bmm(e, e.transpose(1, 2))                               # (N, N, N)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle loss over ordered triplets of distinct indices. (N, H_s), (N, H_t) -> ()."""
    _check(student, teacher, 3, "RKD angle loss")
    n = student.size(0)
    idx = torch.arange(n, device=student.device)
    a, b, c = idx.view(n, 1, 1), idx.view(1, n, 1), idx.view(1, 1, n)
    distinct = (a != b) & (a != c) & (b != c)                            # (N, N, N)
    with torch.no_grad():
        t = _angles(teacher.float())[distinct]
    s = _angles(student.float())[distinct]
    return F.smooth_l1_loss(s, t, reduction="mean")


def _normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """(N, H) -> (N, N): X X^T with each row divided by its L2 norm."""
    return F.normalize(x @ x.t(), p=2, dim=1)


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss ||G~_s - G~_t||_F^2 / N^2. (N, H_s), (N, H_t) -> ()."""
    _check(student, teacher, 2, "similarity loss")
    n = student.size(0)
    g_t = _normalised_gram(teacher.detach().float())
    g_s = _normalised_gram(student.float())
    return (g_s - g_t).pow(2).sum() / (n * n)


RELATION_LOSSES = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss,
                   "similarity": similarity_loss}
