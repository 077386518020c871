"""method: features — hidden-state KD: the student's hidden states, through a learned projection,
match the frozen teacher's at mapped layers (TinyBERT-style).

Data (driver): tuning rows (text or chat), as for sft; the layer map is checked against both models.
Model (worker): the student and the projector as one module (DDP keeps both in step); the teacher
is a frozen transformers model in each worker.
Loss: the per-token feature loss on the hidden states at the response positions (the positions
that predict response tokens), averaged over layer pairs, + task NLL.
"""

from __future__ import annotations

from pathlib import Path

from rayapp.training.distill.data import DistillData, DistillDataError, check_same_vocab, sft_items
from rayapp.training.distill.method import (
    DistillStudent,
    Method,
    Trainable,
    load_frozen,
    student_forward,
    teacher_forward,
)
from rayapp.training.loop import LossParts


def layer_map(cfg, student_dir, teacher_dir) -> list[list[int]]:
    """[[student hidden_states index, teacher index], ...]: features.layer_map or the uniform map."""
    from transformers import AutoConfig

    from rayapp.algorithms.features import uniform_layer_map

    ns = AutoConfig.from_pretrained(str(student_dir)).num_hidden_layers
    nt = AutoConfig.from_pretrained(str(teacher_dir)).num_hidden_layers
    pairs = cfg.features.layer_map or uniform_layer_map(ns, nt)
    bad = [p for p in pairs if not (0 <= p[0] <= ns and 0 <= p[1] <= nt)]
    if bad:
        raise DistillDataError(f"features.layer_map {bad}: hidden_states indices must be 0..{ns} for the student and "
                               f"0..{nt} for the teacher (0 = embeddings)")
    return [list(p) for p in pairs]


def build_data(cfg, tokenizer, out: Path, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    data = sft_items(cfg, tokenizer)
    if not dry:
        check_same_vocab(cfg, tokenizer, teacher_dir)
        data.layer_map = layer_map(cfg, student_dir, teacher_dir)
    return data


def loss(fc, teacher, pairs: list[tuple[int, int]]):
    """The loop's loss_fn for a ``features`` section ``fc``; ``pairs`` is the layer map."""
    from rayapp.algorithms.features import feature_loss
    from rayapp.algorithms.sft import response_mask, token_nll_sum

    def loss_fn(model, batch):
        logits, projected = student_forward(model, batch)  # one per layer pair
        t_hidden = teacher_forward(teacher, batch, hidden=True).hidden_states
        mask = response_mask(batch["labels"])
        feat = sum(feature_loss(h, t_hidden[t], mask, fc.loss)[0] for h, (_, t) in zip(projected, pairs, strict=True))
        feat = feat / len(pairs)
        nll, n = token_nll_sum(logits, batch["labels"])
        total = fc.task_weight * nll + fc.weight * feat
        return LossParts(total, int(n), {"feature_loss": feat.detach(), "nll": nll.detach()})

    return loss_fn


def build_model(cfg, student, payload: dict, device) -> Trainable:
    from rayapp.algorithms.features import FeatureProjector

    teacher = load_frozen(payload["teacher_dir"], cfg.teacher.dtype, device)
    pairs = [tuple(p) for p in payload["layer_map"]]
    projector = FeatureProjector(student.config.hidden_size, teacher.config.hidden_size, len(pairs))
    return Trainable(DistillStudent(student, projector, [s for s, _ in pairs]), loss(cfg.features, teacher, pairs), export=student)


METHOD = Method(build_data=build_data, build_model=build_model)
