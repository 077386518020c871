"""method: self — self-distillation: teacher and student share the architecture.

Data (driver): tuning rows (text or chat), as for sft.
Model (worker): the teacher is frozen (teacher.path, default a copy of the student's start) or an
exponential moving average of the student (``self.teacher: ema``), updated after every optimizer
step and checkpointed with the model.
Loss: the KD divergence to the teacher's full distribution summed over response positions
(+ task NLL).
Rounds (born-again, frozen teacher): round r's teacher is round r-1's student; every round starts
from the same student init.
"""

from __future__ import annotations

from pathlib import Path

from rayapp.training.distill.data import DistillData, sft_items
from rayapp.training.distill.method import (
    Method,
    Trainable,
    ema_update,
    load_frozen,
    round_config,
    student_forward,
    teacher_forward,
)
from rayapp.training.loop import LossParts


def build_data(cfg, tokenizer, out: Path, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    return sft_items(cfg, tokenizer)


def loss(sc, teacher):
    """The loop's loss_fn for a ``self`` section ``sc``."""
    from rayapp.algorithms.kd import kd_loss
    from rayapp.algorithms.sft import response_mask, token_nll_sum

    def loss_fn(model, batch):
        logits, _ = student_forward(model, batch)
        t_logits = teacher_forward(teacher, batch).logits
        mask = response_mask(batch["labels"])
        kd_sum, n = kd_loss(logits, t_logits, mask, sc.divergence, sc.beta, sc.temperature)
        nll, _ = token_nll_sum(logits, batch["labels"])
        total = sc.task_weight * nll + sc.weight * kd_sum
        return LossParts(total, int(n), {"kd_loss": kd_sum.detach(), "nll": nll.detach()})

    return loss_fn


def build_model(cfg, student, payload: dict, device) -> Trainable:
    sc = cfg.self_
    if sc.teacher == "ema":  # starts equal to the student
        teacher = load_frozen(payload["student_dir"], cfg.model.dtype, device)
        return Trainable(student, loss(sc, teacher), after_step=lambda: ema_update(teacher, student, sc.ema_decay),
                         extra_modules={"ema_teacher": teacher})
    return Trainable(student, loss(sc, load_frozen(payload["teacher_dir"], cfg.teacher.dtype, device)))


def rounds(cfg, data: DistillData, student_dir: Path, teacher_dir: str, tokenizer, train) -> dict:
    """Born-again generations (see the module docstring); one plain run when ``self.rounds`` is 1."""
    final = {}
    for r in range(1, cfg.self_.rounds + 1):
        rcfg = cfg if r == cfg.self_.rounds else round_config(cfg, f"round_{r}")
        if cfg.self_.rounds > 1:
            print(f"[{cfg.name}] born-again round {r}/{cfg.self_.rounds}: teacher {teacher_dir}", flush=True)
        final = train(rcfg, data, student_dir, teacher_dir)
        teacher_dir = f"{rcfg.output_dir}/model"  # a path or a URI: the workers resolve it
    return final


METHOD = Method(build_data=build_data, build_model=build_model, rounds=rounds, teacher_defaults_to_student=True)
