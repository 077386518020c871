"""What a distillation method module provides to the recipe, and the pieces its models share.

A method is a :class:`Method`: ``build_data`` on the driver (the teacher output it needs included),
``build_model`` in each worker (a :class:`Trainable`: the module the loop trains, its loss, what to
export), optional ``rounds`` for methods that train more than once (born-again self-distillation,
on-policy GKD), and how the student is asked a held-out question (``answer``).

Units. The loop divides every micro-batch's ``loss_sum`` by the global count of the step's
units; for every method the unit is a supervised (response) token, so terms are combined as sums
over the same tokens (each method's loss says how).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rayapp.data.packing import lm_inputs


@dataclass
class Trainable:
    """What a method's ``build_model`` returns in a worker."""

    model: nn.Module  # what the step loop trains (the recipe wraps it for DDP / FSDP)
    loss_fn: Callable  # (model, batch) -> LossParts
    export: nn.Module | None = None  # what becomes model/ (None: the trained model itself)
    after_step: Callable[[], None] | None = None  # after every optimizer step (an EMA teacher update)
    extra_modules: dict[str, nn.Module] | None = None  # checkpointed with the model


def plain_answer(cfg) -> tuple[Callable[[str], str] | None, str]:
    """How a student is asked a held-out question: the question as is, the answer read from an
    answer marker if there is one, else the first line."""
    return None, "auto"


@dataclass(frozen=True)
class Method:
    # (cfg, tokenizer, out, *, dry, student_dir, teacher_dir) -> DistillData, on the driver
    build_data: Callable[..., Any]
    # (cfg, student, payload, device) -> Trainable, in each worker
    build_model: Callable[..., Trainable]
    # (cfg, data, student_dir, teacher_dir, tokenizer, train) -> final metrics; train(cfg, data,
    # student_dir, teacher_dir) runs the workers once. None: train once.
    rounds: Callable[..., dict] | None = None
    answer: Callable[[Any], tuple[Callable[[str], str] | None, str]] = plain_answer
    teacher_defaults_to_student: bool = False  # no teacher.path: a frozen copy of the student's start


def round_config(cfg, name: str | None, **train_updates):
    """The job config of one round: output_dir/<name> (output_dir itself for ``None``; a local
    path or a URI alike), and its train settings."""
    update: dict[str, Any] = {"output_dir": f"{cfg.output_dir.rstrip('/')}/{name}" if name else cfg.output_dir}
    if train_updates:
        update["train"] = cfg.train.model_copy(update=train_updates)
    return cfg.model_copy(update=update)


class DistillStudent(nn.Module):
    """The student plus what distillation trains with it (a feature projector), as one module so
    DDP synchronises all of it. forward -> (logits (B, T, V), [hidden states of ``hidden_layers``,
    projected when a projector is set])."""

    def __init__(self, student: nn.Module, projector: nn.Module | None = None, hidden_layers: tuple[int, ...] = ()):
        super().__init__()
        self.student = student
        self.projector = projector
        self.hidden_layers = tuple(hidden_layers)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                           output_hidden_states=bool(self.hidden_layers))
        hidden = [out.hidden_states[i] for i in self.hidden_layers]
        if self.projector is not None:
            hidden = self.projector(hidden)
        return out.logits, hidden


def student_forward(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden states) from a DistillStudent, or from a bare (DDP/FSDP-wrapped) causal LM
    when the method needs no hidden states (step_by_step, logits, self keep the model unwrapped so
    LoRA export and FSDP work as in SFT)."""
    out = model(**lm_inputs(batch))
    if isinstance(out, tuple):
        return out
    return out.logits, []


def teacher_forward(teacher, batch, hidden: bool = False):
    """The frozen teacher's output on the student's batch, without gradients."""
    with torch.no_grad():
        return teacher(**lm_inputs(batch), output_hidden_states=hidden)


def load_frozen(model_dir: str, dtype: str, device) -> nn.Module:
    """A teacher that lives in the worker (transformers, eval mode, no gradients)."""
    from rayapp.models.io import load_causal_lm

    return load_causal_lm(model_dir, dtype).to(device).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
