"""What the distillation workers compute per micro-batch: the items and their collation, the
student wrapper that also returns hidden states, and one loss per method (a registry). The maths
itself lives in ``rayapp.algorithms`` (step_by_step, kd, features, relations, sft); this module
wires model outputs into it and returns ``LossParts`` for the shared loop.

Units. The loop divides every micro-batch's ``loss_sum`` by the global count of the step's
units; here the unit is a supervised (response) token for every method, so terms are combined
as sums over the same tokens:

* step_by_step: alpha * L_label + (1 - alpha) * L_rationale with each L a mean over its own task's
  tokens (reference code). The loop has one global count per step, so each task's NLL sum is
  divided by the task's share of the training set's supervised tokens (p_label, p_rationale,
  measured on the driver) before ``two_task_loss``. Divided by the global token count this is
  exactly alpha * mean_label + (1 - alpha) * mean_rationale when a batch holds the tasks in the
  data's proportion, and that in expectation otherwise. With rationale_weight 0 there are only
  label examples and it is exactly the token-mean NLL. Validation (model.eval()) reports plain NLL;
  its rows are label-task rows (the task asked at inference), so val_loss is the label NLL.
* logits, self: the KD divergence summed over response positions (+ ce_weight x NLL).
* features: the per-token feature loss on the hidden states at the response positions (the
  positions that predict response tokens), averaged over layer pairs, + task NLL.
* relations: one relation loss per micro-batch over its examples' mean-pooled hidden states
  (whole sequence), weighted by the micro-batch's token count so the loop's global mean gives a
  token-weighted average of micro-batch relation losses, + task NLL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rayapp.algorithms.features import feature_loss
from rayapp.algorithms.kd import kd_loss, topk_kd_loss
from rayapp.algorithms.relations import RELATION_LOSSES, masked_mean_pool
from rayapp.algorithms.sft import token_nll_sum
from rayapp.algorithms.step_by_step import split_task_nll_sums, two_task_loss
from rayapp.data.collate import collate_sft
from rayapp.training.loop import LossParts


@dataclass
class DistillItem:
    input_ids: list[int]
    labels: list[int]  # -100 outside the response
    is_rationale: bool = False  # step_by_step: the explain task
    topk_ids: list[list[int]] | None = None  # logits: (len - 1, K) teacher top-k for the token after each position
    topk_logprobs: list[list[float]] | None = None  # (len - 1, K)


def collate_distill(items: list[DistillItem], pad_id: int) -> dict:
    """collate_sft's input_ids / attention_mask / labels (B, T), is_rationale (B,), and for logits
    topk_ids / topk_logprobs (B, T, K) (padding positions: token 0 at log-prob log(1/K), masked out)."""
    batch = collate_sft(items, pad_id)
    batch["is_rationale"] = torch.tensor([it.is_rationale for it in items], dtype=torch.bool)  # (B,)
    if items[0].topk_ids is not None:
        B, T = batch["input_ids"].shape
        K = len(items[0].topk_ids[0])
        ids = torch.zeros((B, T, K), dtype=torch.long)
        lps = torch.full((B, T, K), -math.log(K), dtype=torch.float32)
        for i, it in enumerate(items):
            n = len(it.topk_ids)
            ids[i, :n] = torch.tensor(it.topk_ids, dtype=torch.long)
            lps[i, :n] = torch.tensor(it.topk_logprobs, dtype=torch.float32)
        batch["topk_ids"], batch["topk_logprobs"] = ids, lps
    return batch


def count_supervised(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t predicts a response token (labels[t + 1] != -100). Its count equals
    token_nll_sum's token count, so KD / feature sums and the NLL share one unit."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


class DistillStudent(nn.Module):
    """The student plus what distillation trains with it (a feature projector), as one module so
    DDP synchronises all of it. forward -> (logits (B, T, V), [hidden states of ``hidden_layers``,
    projected when a projector is set])."""

    def __init__(self, student: nn.Module, projector: nn.Module | None = None, hidden_layers: tuple[int, ...] = ()):
        super().__init__()
        self.student = student
        self.projector = projector
        self.hidden_layers = tuple(hidden_layers)

    def forward(self, input_ids=None, attention_mask=None):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.hidden_layers))
        hidden = [out.hidden_states[i] for i in self.hidden_layers]
        if self.projector is not None:
            hidden = self.projector(hidden)
        return out.logits, hidden


def student_forward(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden states) from a DistillStudent, or from a bare (DDP/FSDP-wrapped) causal LM
    when the method needs no hidden states (step_by_step, logits, self keep the model unwrapped so
    LoRA export and FSDP work as in SFT)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if isinstance(out, tuple):
        return out
    return out.logits, []


def _teacher_out(teacher, batch, hidden: bool = False):
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)


def step_by_step_loss(alpha: float, p_label: float, p_rationale: float):
    def loss(model, batch):
        logits, _ = student_forward(model, batch)
        ls, ln, rs, rn = split_task_nll_sums(logits, batch["labels"], batch["is_rationale"])
        if not model.training:  # validation: plain token-mean NLL (held-out rows are label-task rows)
            return LossParts(ls + rs, int(ln + rn), {})
        label_term = ls / p_label if p_label > 0 else ls
        rationale_term = rs / p_rationale if p_rationale > 0 else rs
        total = two_task_loss(label_term, rationale_term, alpha)
        return LossParts(total, int(ln + rn), {"label_loss": label_term.detach(), "rationale_loss": rationale_term.detach()})

    return loss


def logits_loss(lc):
    def loss(model, batch):
        logits, _ = student_forward(model, batch)
        mask = response_mask(batch["labels"])
        kd_sum, n = topk_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], mask,
                                 lc.divergence, lc.beta, lc.temperature, lc.topk_mode)
        nll, _ = token_nll_sum(logits, batch["labels"])
        total = kd_sum + lc.ce_weight * nll if lc.ce_weight else kd_sum
        return LossParts(total, int(n), {"kd_loss": kd_sum.detach(), "nll": nll.detach()})

    return loss


def features_loss(fc, teacher, layer_map: list[tuple[int, int]]):
    def loss(model, batch):
        logits, projected = student_forward(model, batch)  # one per layer pair
        t_hidden = _teacher_out(teacher, batch, hidden=True).hidden_states
        mask = response_mask(batch["labels"])
        feat = sum(feature_loss(h, t_hidden[t], mask, fc.loss)[0] for h, (_, t) in zip(projected, layer_map, strict=True))
        feat = feat / len(layer_map)
        nll, n = token_nll_sum(logits, batch["labels"])
        total = fc.task_weight * nll + fc.weight * feat
        return LossParts(total, int(n), {"feature_loss": feat.detach(), "nll": nll.detach()})

    return loss


def relations_loss(rc, teacher, min_batch: int):
    relation = RELATION_LOSSES[rc.loss]

    def loss(model, batch):
        logits, (s_hidden,) = student_forward(model, batch)
        nll, n = token_nll_sum(logits, batch["labels"])
        if batch["input_ids"].size(0) < min_batch:  # a short last validation batch: task loss only
            rel = torch.zeros((), dtype=torch.float32, device=nll.device)
        else:
            t_hidden = _teacher_out(teacher, batch, hidden=True).hidden_states[rc.teacher_layer]
            am = batch["attention_mask"]
            rel = relation(masked_mean_pool(s_hidden.float(), am), masked_mean_pool(t_hidden.float(), am))
        rel_sum = rel * n
        total = rc.task_weight * nll + rc.weight * rel_sum
        return LossParts(total, int(n), {"relation_loss": rel_sum.detach(), "nll": nll.detach()})

    return loss


def self_loss(sc, teacher):
    def loss(model, batch):
        logits, _ = student_forward(model, batch)
        t_logits = _teacher_out(teacher, batch).logits
        mask = response_mask(batch["labels"])
        kd_sum, n = kd_loss(logits, t_logits, mask, sc.divergence, sc.beta, sc.temperature)
        nll, _ = token_nll_sum(logits, batch["labels"])
        total = sc.task_weight * nll + sc.weight * kd_sum
        return LossParts(total, int(n), {"kd_loss": kd_sum.detach(), "nll": nll.detach()})

    return loss


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
