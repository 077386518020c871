"""method: relations — relation-based KD (RKD distance / angle, similarity): the student matches the
pairwise structure of a micro-batch's examples in the frozen teacher's hidden space.

Data (driver): tuning rows (text or chat), as for sft.
Model (worker): the student returning one layer's hidden states; the teacher is a frozen
transformers model in each worker.
Loss: one relation loss per micro-batch over its examples' mean-pooled hidden states (whole
sequence), weighted by the micro-batch's token count so the loop's global mean gives a
token-weighted average of micro-batch relation losses, + task NLL.
"""

from __future__ import annotations

from pathlib import Path

from rayapp.training.distill.data import DistillData, check_same_vocab, sft_items
from rayapp.training.distill.method import (
    DistillStudent,
    Method,
    Trainable,
    load_frozen,
    student_forward,
    teacher_forward,
)
from rayapp.training.loop import LossParts


def build_data(cfg, tokenizer, out: Path, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    if not dry:
        check_same_vocab(cfg, tokenizer, teacher_dir)
    return sft_items(cfg, tokenizer)


def loss(rc, teacher, min_batch: int):
    """The loop's loss_fn for a ``relations`` section ``rc``; smaller micro-batches get the task loss only."""
    import torch

    from rayapp.algorithms.relations import RELATION_LOSSES, masked_mean_pool
    from rayapp.algorithms.sft import token_nll_sum

    relation = RELATION_LOSSES[rc.loss]

    def loss_fn(model, batch):
        logits, (s_hidden,) = student_forward(model, batch)
        nll, n = token_nll_sum(logits, batch["labels"])
        if batch["input_ids"].size(0) < min_batch:  # a short last validation batch: task loss only
            rel = torch.zeros((), dtype=torch.float32, device=nll.device)
        else:
            t_hidden = teacher_forward(teacher, batch, hidden=True).hidden_states[rc.teacher_layer]
            am = batch["attention_mask"]
            rel = relation(masked_mean_pool(s_hidden.float(), am), masked_mean_pool(t_hidden.float(), am))
        rel_sum = rel * n
        total = rc.task_weight * nll + rc.weight * rel_sum
        return LossParts(total, int(n), {"relation_loss": rel_sum.detach(), "nll": nll.detach()})

    return loss_fn


def build_model(cfg, student, payload: dict, device) -> Trainable:
    rc = cfg.relations
    teacher = load_frozen(payload["teacher_dir"], cfg.teacher.dtype, device)
    min_batch = 3 if rc.loss == "rkd_angle" else 2
    return Trainable(DistillStudent(student, None, [rc.student_layer]), loss(rc, teacher, min_batch), export=student)


METHOD = Method(build_data=build_data, build_model=build_model)
