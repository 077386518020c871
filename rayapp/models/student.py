"""Student initialisation for distillation: a model directory as is, or a smaller copy of the
teacher that keeps some of its layers (DistilBERT, Sanh et al. 2019, kept one layer in two).

``from_teacher_layers`` copies the embeddings, final norm, LM head and the chosen decoder
layers' weights, renumbers the layers 0..M-1 and writes a regular Hugging Face directory
(safetensors + tokenizer) that transformers and vLLM load. It works for decoder stacks whose
parameters are named ``...layers.N....`` (Llama, Mistral, Qwen, SmolLM, GPT-NeoX) or ``...h.N....``
(GPT-2).
"""

from __future__ import annotations

import re
from pathlib import Path

from rayapp.errors import UserError

_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h)\.)(?P<idx>\d+)(?P<post>\..*)$")


class StudentInitError(UserError, ValueError):
    pass


def kept_layers(num_teacher_layers: int, keep_every: int = 2, layers: list[int] | None = None) -> list[int]:
    """Teacher layer indices the student keeps, in order.

    Every k-th layer counted so that the last layer is always kept (its output feeds the
    head): N=6, k=2 -> [1, 3, 5]; N=2, k=2 -> [1]. ``layers`` overrides ``keep_every``.

    >>> kept_layers(6, 3)
    [2, 5]
    """
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_teacher_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise StudentInitError(
                f"student.layers {layers}: expected distinct indices in 0..{num_teacher_layers - 1} "
                f"(the teacher has {num_teacher_layers} layers)"
            )
        return sorted(layers)
    if keep_every < 1:
        raise StudentInitError(f"student.keep_every must be >= 1, found {keep_every}")
    return list(range(num_teacher_layers - 1, -1, -keep_every))[::-1]


def select_layer_weights(state: dict, keep: list[int]) -> dict:
    """The state dict with only the ``keep`` layers, renumbered 0..len(keep)-1; other weights unchanged."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        old = int(m.group("idx"))
        if old in new_index:
            out[f"{m.group('pre')}{new_index[old]}{m.group('post')}"] = value
    return out


def from_teacher_layers(teacher_dir: str | Path, out_dir: str | Path, keep_every: int = 2,
                        layers: list[int] | None = None, dtype: str = "float32") -> Path:
    """Write a student made of the teacher's layers ``kept_layers(N, keep_every, layers)`` to ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayapp.models.io import load_causal_lm, load_tokenizer, save_model_atomic, torch_dtype

    teacher_dir = str(teacher_dir)
    teacher = load_causal_lm(teacher_dir, dtype)
    config = AutoConfig.from_pretrained(teacher_dir)
    n = config.num_hidden_layers
    keep = kept_layers(n, keep_every, layers)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding / full)
        config.layer_types = [config.layer_types[i] for i in keep]
    state = select_layer_weights(teacher.state_dict(), keep)
    student = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise StudentInitError(
            f"student.init: from_teacher_layers cannot map {teacher_dir}'s weights by layer "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}); use student.init: from_model with a prepared student"
        )
    if tied:
        student.tie_weights()
    return save_model_atomic(student, load_tokenizer(teacher_dir), out_dir)


def build_student(cfg, out: Path) -> Path:
    """The directory of the student to train: model.path, or a layer subset of the teacher written to out/student_init."""
    from rayapp.models.io import resolve_model

    if cfg.student.init == "from_model":
        return resolve_model(cfg.model.path)
    target = out / "student_init"
    teacher_dir = resolve_model(cfg.teacher.path, "teacher.path")
    return from_teacher_layers(teacher_dir, target, cfg.student.keep_every, cfg.student.layers, cfg.model.dtype)
