"""method: step_by_step — distilling step-by-step (Hsieh et al., 2023): labels and teacher
rationales as two tasks of one student.

Data (driver): distillation inputs ``{input_text, output_text?}``, or a teacher-output file in
``teacher.outputs``. Rows that need the teacher (every row when rationale_weight > 0, for its
rationale; unlabelled rows for their label) get teacher rationales and labels
(``teacher.teacher_rationales``, cached). A gold label wins over the teacher's label (the paper
trains on gold labels where there are any). Each row becomes the two examples of
``rayapp.algorithms.step_by_step.two_task_examples``.

Loss: alpha * L_label + (1 - alpha) * L_rationale with each L a mean over its own task's tokens
(reference code). The loop has one global count per step, so each task's NLL sum is divided by
the task's share of the training set's supervised tokens (p_label, p_rationale, measured on the
driver) before ``two_task_loss``. Divided by the global token count this is exactly
alpha * mean_label + (1 - alpha) * mean_rationale when a batch holds the tasks in the data's
proportion, and that in expectation otherwise. With rationale_weight 0 there are only label
examples and it is exactly the token-mean NLL. Validation (model.eval()) reports plain NLL; its
rows are label-task rows (the task asked at inference), so val_loss is the label NLL.
"""

from __future__ import annotations

from pathlib import Path

from rayapp.training.distill.data import DistillData, DistillDataError, encode_examples
from rayapp.training.distill.method import Method, Trainable, student_forward
from rayapp.training.loop import LossParts

REJECTS_SHOWN = ("unparsable", "gold_mismatch", "empty_rationale", "prompt_too_long")


def _rows(cfg, out: Path, dry: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """[{input_text, label, rationale | None}] for the training file, teacher output merged in."""
    from rayapp.data.loaders import load_distill_inputs, load_teacher_outputs
    from rayapp.training.distill.teacher import teacher_rationales

    rw = cfg.step_by_step.rationale_weight
    if cfg.teacher.outputs:
        records, stats = load_teacher_outputs(cfg.teacher.outputs, cfg.data)
        rows = [{"input_text": r.input_text, "label": r.extra.get("gold_label") or r.label, "rationale": r.rationale} for r in records]
        return rows, {"train": stats.to_dict()}
    records, stats = load_distill_inputs(cfg.data.train, cfg.data)
    need = [i for i, r in enumerate(records) if rw > 0 or r.label is None]
    result = {"train": stats.to_dict()}
    if not need:
        return [{"input_text": r.input_text, "label": r.label, "rationale": None} for r in records], result
    if dry:
        notes.append(f"{len(need)} of {len(records)} rows need the teacher ({'rationales' if rw > 0 else 'labels'}); "
                     f"it runs at `rayapp run` (cached in {out / 'teacher'})")
        return [{"input_text": r.input_text, "label": r.label or "?", "rationale": "?" if rw > 0 else None} for r in records], result
    inputs = [{"input_text": records[i].input_text, **({"output_text": records[i].label} if records[i].label is not None else {})}
              for i in need]
    teacher_rows, tstats = teacher_rationales(cfg, inputs, out, str(cfg.data.train))
    result["teacher"] = tstats
    lost = len(need) - len(teacher_rows)
    if lost:
        notes.append(f"teacher: {lost} of {len(need)} rows got no usable rationale/label and are left out "
                     f"({', '.join(f'{k} {tstats[k]}' for k in REJECTS_SHOWN if tstats.get(k))}); "
                     f"see {out / 'teacher' / 'rationales' / 'rejects.jsonl'}")
    by_text = {}
    for t in teacher_rows:
        by_text.setdefault(t.input_text, t)
    needed, rows = set(need), []
    for i, r in enumerate(records):
        t = by_text.get(r.input_text)
        if i in needed and t is None:
            continue
        label = r.label if r.label is not None else t.label
        rows.append({"input_text": r.input_text, "label": label, "rationale": t.rationale if (t and rw > 0) else None})
    if not rows:
        raise DistillDataError(f"{cfg.data.train}: the teacher produced no usable rationale or label for any row "
                               f"({result['teacher']}); check teacher.path, teacher.rationales and teacher.sampling.max_tokens")
    return rows, result


def build_data(cfg, tokenizer, out: Path, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    from rayapp.algorithms.step_by_step import RATIONALE_TASK, two_task_examples
    from rayapp.data.formats import ANSWER_MARKER
    from rayapp.data.loaders import load_distill_inputs, split_indices

    s = cfg.step_by_step
    notes: list[str] = []
    rows, stats = _rows(cfg, out, dry, notes)
    val_rows: list[dict] = []
    if cfg.data.validation:
        records, vstats = load_distill_inputs(cfg.data.validation, cfg.data)
        stats["validation"] = vstats.to_dict()
        val_rows = [{"input_text": r.input_text, "label": r.label} for r in records if r.label is not None]
    elif cfg.data.validation_split > 0:
        keep, held = split_indices(len(rows), cfg.data.validation_split, cfg.train.seed)
        val_rows = [rows[i] for i in held]
        rows = [rows[i] for i in keep]

    marker = ANSWER_MARKER if s.explain_target == "rationale_and_label" else None
    triples = [(prompt, target, task) for r in rows
               for task, prompt, target in two_task_examples(r["input_text"], r["label"], r["rationale"] if s.rationale_weight > 0 else None,
                                                           s.predict_prefix, s.explain_prefix, marker)]
    train, enc_stats = encode_examples(cfg, tokenizer, triples, str(cfg.data.train), is_rationale=lambda tag: tag == RATIONALE_TASK)
    stats["train_encoded"] = enc_stats
    val = None
    if val_rows:
        vtriples = [(s.predict_prefix + r["input_text"], r["label"], "predict") for r in val_rows]
        val, _ = encode_examples(cfg, tokenizer, vtriples, str(cfg.data.validation or "validation_split"))
    label_tokens = sum(it.num_supervised for it in train if not it.is_rationale)
    total = sum(it.num_supervised for it in train)
    p_label = label_tokens / total if total else 1.0
    eval_src = [{"input_text": r["input_text"], "label": r["label"]} for r in val_rows]
    return DistillData(train, val, stats, p_label=p_label, p_rationale=1.0 - p_label, eval=eval_src, notes=notes)


def loss(alpha: float, p_label: float, p_rationale: float):
    """The loop's loss_fn; see the module docstring."""
    from rayapp.algorithms.step_by_step import split_task_nll_sums, two_task_loss

    def loss_fn(model, batch):
        logits, _ = student_forward(model, batch)
        ls, ln, rs, rn = split_task_nll_sums(logits, batch["labels"], batch["is_rationale"])
        if not model.training:  # validation: plain token-mean NLL (held-out rows are label-task rows)
            return LossParts(ls + rs, int(ln + rn), {})
        label_term = ls / p_label if p_label > 0 else ls
        rationale_term = rs / p_rationale if p_rationale > 0 else rs
        total = two_task_loss(label_term, rationale_term, alpha)
        return LossParts(total, int(ln + rn), {"label_loss": label_term.detach(), "rationale_loss": rationale_term.detach()})

    return loss_fn


def build_model(cfg, student, payload: dict, device) -> Trainable:
    return Trainable(student, loss(1.0 - cfg.step_by_step.rationale_weight, payload["p_label"], payload["p_rationale"]))


def answer(cfg):
    """The student is asked for the label (the predict task) and answers with it alone."""
    prefix = cfg.step_by_step.predict_prefix
    return (lambda x: prefix + x), "answer"


METHOD = Method(build_data=build_data, build_model=build_model, answer=answer)
