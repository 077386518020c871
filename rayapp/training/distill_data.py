"""Distillation data, built on the driver before any worker starts.

* step_by_step: distillation inputs ``{input_text, output_text?}`` (or a teacher-output file in
  ``teacher.outputs``). Rows that need the teacher (every row when rationale_weight > 0, for its
  rationale; unlabelled rows for their label) get teacher rationales and labels
  (``distill_teacher.teacher_rationales``, cached). A gold label wins over the teacher's label
  (the paper trains on gold labels where there are any). Each row becomes the two examples of
  ``rayapp.algorithms.step_by_step.two_task_examples``.
* logits: tuning rows (responses given) or distillation inputs whose responses the teacher writes
  (``logits.responses: teacher``), each with the teacher's top-k log-probs per response position.
* features, relations, self: tuning rows (text or chat), as for sft.

Bad rows follow ``data.on_bad_rows`` (stop with file:line: field: reason, or drop and count).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.data.stats import DatasetStats
from rayapp.errors import UserError


class DistillDataError(UserError, ValueError):
    pass


@dataclass
class DistillData:
    train: list
    val: list | None
    stats: dict
    p_label: float = 1.0  # step_by_step: share of supervised training tokens in each task
    p_rationale: float = 0.0
    layer_map: list | None = None
    prompts: list[str] = field(default_factory=list)  # logits: the prompts, in train order (on-policy rounds)
    eval: list[dict] = field(default_factory=list)  # held-out rows {input_text, label} for answer accuracy
    notes: list[str] = field(default_factory=list)
    chat: bool = True

    def replace(self, **kw) -> DistillData:
        return dataclasses.replace(self, **kw)

    def render_for_engine(self, prompts: list[str]) -> list:
        return [[{"role": "user", "content": p}] for p in prompts] if self.chat else list(prompts)

    def describe(self) -> str:
        lines = [f"train: {len(self.train)} examples" + (f", validation: {len(self.val)}" if self.val else "")]
        if self.p_rationale:
            lines.append(f"supervised tokens: label task {self.p_label:.1%}, rationale task {self.p_rationale:.1%}")
        if self.eval:
            lines.append(f"answer-accuracy rows: {len(self.eval)}")
        for split, s in self.stats.items():
            if isinstance(s, dict) and "rows" in s:
                lines.append(f"{split}: " + DatasetStats.format_line(s))
        return "\n".join(lines + self.notes)

    def report_sections(self, answers: dict) -> list[tuple[str, str]]:
        import html

        parts = []
        for who, r in answers.items():
            rows = "".join(
                f"<tr><td>{html.escape(s['input_text'])}</td><td>{html.escape(str(s['gold']))}</td>"
                f"<td>{html.escape(s['completion'])}</td><td>{'yes' if s['correct'] else 'no'}</td></tr>"
                for s in r["samples"]
            )
            parts.append((f"Answers: {who} ({r['correct']}/{r['n']} = {r['accuracy']:.3f}, {r['backend']})",
                          f"<table><tr><th>input</th><th>gold</th><th>completion</th><th>correct</th></tr>{rows}</table>"))
        if self.notes:
            parts.append(("Notes", "<pre>" + html.escape("\n".join(self.notes)) + "</pre>"))
        return parts


def _encode_all(cfg, tokenizer, pairs: list[tuple], where: str, make) -> tuple[list, dict]:
    """Encode (prompt, target, tag) triples with the SFT encoder; bad ones follow data.on_bad_rows."""
    from rayapp.data.formats import RowError, TextExample
    from rayapp.data.loaders import bad_rows_error
    from rayapp.data.tokenize import encode_example

    items, problems, truncated = [], [], 0
    for i, (prompt, target, tag) in enumerate(pairs):
        try:
            enc = encode_example(tokenizer, TextExample(prompt, target), cfg.model.max_seq_len, cfg.data.chat_template, cfg.data.overlong)
        except RowError as e:
            problems.append(f"{where} #{i + 1} ({tag}): {e.field}: {e.reason}")
            continue
        truncated += int(enc.truncated)
        items.append(make(enc, tag))
    if problems and cfg.data.on_bad_rows == "error":
        raise bad_rows_error(where, problems)
    return items, {"examples": len(items), "dropped": len(problems), "truncated": truncated}


def encode_pairs(cfg, tokenizer, pairs: list[tuple[str, str]]) -> list:
    from rayapp.training.distill_losses import DistillItem

    items, _ = _encode_all(cfg, tokenizer, [(p, t, "response") for p, t in pairs], "on-policy samples",
                           lambda enc, tag: DistillItem(enc.input_ids, enc.labels))
    return items


def with_topk(cfg, items: list, out: Path, pool=None, tag: str = "topk") -> list:
    """Attach the teacher's top-k log-probs (cached in out/teacher/<tag>.jsonl) to each item."""
    from rayapp.training.distill_teacher import teacher_topk

    if not items:
        return items
    rows = teacher_topk(cfg, [it.input_ids for it in items], out, pool, tag)
    return [dataclasses.replace(it, topk_ids=r["ids"], topk_logprobs=r["logprobs"]) for it, r in zip(items, rows, strict=True)]


def rationale_prompt(cfg, model_dir: str):
    from rayapp.training.distill_teacher import _has_chat_template, rationale_template

    template = rationale_template(cfg)
    chat = cfg.teacher.chat == "always" or (cfg.teacher.chat == "auto" and _has_chat_template(model_dir))
    return lambda x: template.render(x, chat)


# -- step_by_step --------------------------------------------------------------------------------

def _step_by_step_rows(cfg, out: Path, dry: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """[{input_text, label, rationale | None}] for the training file, teacher output merged in."""
    from rayapp.data.loaders import load_distill_inputs, load_teacher_outputs
    from rayapp.training.distill_teacher import teacher_rationales

    rw = cfg.step_by_step.rationale_weight
    if cfg.teacher.outputs:
        records, stats = load_teacher_outputs(cfg.teacher.outputs, cfg.data)
        rows = [{"input_text": r.input_text, "label": r.extra.get("gold_label") or r.label, "rationale": r.rationale} for r in records]
        return rows, {"train": stats.to_dict()}
    records, stats = load_distill_inputs(cfg.data.train, cfg.data)
    inputs = [{"input_text": r.input_text, "output_text": r.label} for r in records]
    need = [i for i, r in enumerate(records) if rw > 0 or r.label is None]
    result = {"train": stats.to_dict()}
    if not need:
        return [{"input_text": r.input_text, "label": r.label, "rationale": None} for r in records], result
    if dry:
        notes.append(f"{len(need)} of {len(records)} rows need the teacher ({'rationales' if rw > 0 else 'labels'}); "
                     f"it runs at `rayapp run` (cached in {out / 'teacher'})")
        return [{"input_text": r.input_text, "label": r.label or "?", "rationale": "?" if rw > 0 else None} for r in records], result
    teacher_rows, tstats = teacher_rationales(cfg, [inputs[i] for i in need], out, str(cfg.data.train))
    result["teacher"] = {k: v for k, v in tstats.items() if k != "rejects"}
    lost = len(need) - len(teacher_rows)
    if lost:
        notes.append(f"teacher: {lost} of {len(need)} rows got no usable rationale/label and are left out "
                     f"({', '.join(f'{k} {v}' for k, v in tstats.items() if k in ('unparsable', 'gold_mismatch', 'empty_rationale', 'prompt_too_long') and v)}); "
                     f"see {out / 'teacher' / 'rationales.meta.json'}")
    by_text = {}
    for t in teacher_rows:
        by_text.setdefault(t["input_text"], t)
    rows = []
    for i, r in enumerate(records):
        t = by_text.get(r.input_text)
        if i in set(need) and t is None:
            continue
        label = r.label if r.label is not None else t["label"]
        rows.append({"input_text": r.input_text, "label": label, "rationale": t["rationale"] if (t and rw > 0) else None})
    if not rows:
        raise DistillDataError(f"{cfg.data.train}: the teacher produced no usable rationale or label for any row "
                               f"({result['teacher']}); check teacher.path, teacher.rationales and teacher.sampling.max_tokens")
    return rows, result


def _step_by_step(cfg, tokenizer, out: Path, dry: bool) -> DistillData:
    from rayapp.algorithms.step_by_step import RATIONALE_TASK, two_task_examples
    from rayapp.data.loaders import load_distill_inputs, split_indices
    from rayapp.teachers.templates import ANSWER_MARKER
    from rayapp.training.distill_losses import DistillItem

    s = cfg.step_by_step
    notes: list[str] = []
    rows, stats = _step_by_step_rows(cfg, out, dry, notes)
    val_rows: list[dict] = []
    if cfg.data.validation:
        records, vstats = load_distill_inputs(cfg.data.validation, cfg.data)
        stats["validation"] = vstats.to_dict()
        val_rows = [{"input_text": r.input_text, "label": r.label} for r in records if r.label is not None]
    elif cfg.data.validation_split > 0:
        keep, held = split_indices(len(rows), cfg.data.validation_split, cfg.train.seed)
        val_rows = [rows[i] for i in held]
        rows = [rows[i] for i in keep]

    def make(enc, tag):
        return DistillItem(enc.input_ids, enc.labels, is_rationale=tag == RATIONALE_TASK)

    marker = ANSWER_MARKER if s.explain_target == "rationale_and_label" else None
    triples = [(prompt, target, task) for r in rows
               for task, prompt, target in two_task_examples(r["input_text"], r["label"], r["rationale"] if s.rationale_weight > 0 else None,
                                                           s.predict_prefix, s.explain_prefix, marker)]
    train, enc_stats = _encode_all(cfg, tokenizer, triples, str(cfg.data.train), make)
    stats["train_encoded"] = enc_stats
    val = None
    if val_rows:
        vtriples = [(s.predict_prefix + r["input_text"], r["label"], "predict") for r in val_rows]
        val, _ = _encode_all(cfg, tokenizer, vtriples, str(cfg.data.validation or "validation_split"), make)
    label_tokens = sum(sum(1 for x in it.labels if x != -100) for it in train if not it.is_rationale)
    total = sum(sum(1 for x in it.labels if x != -100) for it in train)
    p_label = label_tokens / total if total else 1.0
    eval_src = [{"input_text": r["input_text"], "label": r["label"]} for r in val_rows]
    return DistillData(train, val, stats, p_label=p_label, p_rationale=1.0 - p_label, eval=eval_src, notes=notes)


# -- logits / features / relations / self ----------------------------------------------------------

def _sft_items(cfg, tokenizer):
    from rayapp.data.sft import load_sft_splits
    from rayapp.training.distill_losses import DistillItem

    train, val = load_sft_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)
    stats = {"train": train.stats.to_dict(), "validation": val.stats.to_dict() if val else None}
    conv = [DistillItem(e.input_ids, e.labels) for e in train.examples]
    return conv, [DistillItem(e.input_ids, e.labels) for e in val.examples] if val else None, stats


def _check_same_vocab(cfg, tokenizer, teacher_dir: str | None) -> None:
    from rayapp.models.io import load_tokenizer

    if teacher_dir is None:
        return
    t = load_tokenizer(teacher_dir)
    if t.get_vocab() != tokenizer.get_vocab():
        raise DistillDataError(
            f"method: {cfg.method} compares teacher and student token by token, but teacher.path ({cfg.teacher.path}) "
            f"and the student ({cfg.model.path}) use different tokenizers ({len(t)} vs {len(tokenizer)} tokens); "
            "use a student built from the teacher (student.init: from_teacher_layers) or one sharing its tokenizer"
        )


def _logits(cfg, tokenizer, out: Path, dry: bool) -> DistillData:
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.training.distill_losses import DistillItem
    from rayapp.training.distill_teacher import teacher_pool, teacher_responses

    notes: list[str] = []
    if cfg.logits.responses == "teacher":
        records, st = load_distill_inputs(cfg.data.train, cfg.data)
        prompts = [r.input_text for r in records]
        stats = {"train": st.to_dict()}
        if dry:
            responses = ["?"] * len(prompts)
            notes.append(f"the teacher writes {len(prompts)} responses at `rayapp run`")
        else:
            responses = teacher_responses(cfg, prompts, out)
        train, _ = _encode_all(cfg, tokenizer, [(p, r, "response") for p, r in zip(prompts, responses, strict=True) if r.strip()],
                               str(cfg.data.train), lambda enc, tag: DistillItem(enc.input_ids, enc.labels))
        val = None
    else:
        train, val, stats = _sft_items(cfg, tokenizer)
        prompts = _prompts_of(cfg)
    if dry:
        notes.append(f"teacher top-{cfg.logits.top_k} log-probs are computed at `rayapp run` for {len(train)} sequences")
        return DistillData(train, val, stats, prompts=prompts, notes=notes)
    with teacher_pool(cfg) as pool:
        train = with_topk(cfg, train, out, pool, "topk")
        val = with_topk(cfg, val, out, pool, "topk_validation") if val else None
    return DistillData(train, val, stats, prompts=prompts, notes=notes)


def _prompts_of(cfg) -> list[str]:
    """The input_text of each training row (on-policy sampling); chat rows give their last user turn."""
    from rayapp.data.readers import read_rows

    prompts = []
    for row in read_rows(cfg.data.train, cfg.data.max_rows):
        d = row.data or {}
        if "input_text" in d:
            prompts.append(str(d["input_text"]))
        elif isinstance(d.get("messages"), list):
            users = [m.get("content", "") for m in d["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            prompts.append(users[-1] if users else "")
    return [p for p in prompts if p.strip()]


def _layer_map(cfg, student_dir, teacher_dir) -> list[list[int]]:
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


def build_data(cfg, tokenizer, out: Path, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    from rayapp.data.tokenize import use_chat_template

    if cfg.method == "step_by_step":
        data = _step_by_step(cfg, tokenizer, out, dry)
    elif cfg.method == "logits":
        if not dry:
            _check_same_vocab(cfg, tokenizer, teacher_dir)
        data = _logits(cfg, tokenizer, out, dry)
    else:
        if not dry and cfg.method != "self":
            _check_same_vocab(cfg, tokenizer, teacher_dir)
        train, val, stats = _sft_items(cfg, tokenizer)
        data = DistillData(train, val, stats)
        if cfg.method == "features" and not dry:
            data.layer_map = _layer_map(cfg, student_dir, teacher_dir)
    data.chat = use_chat_template(tokenizer, cfg.data.chat_template)
    if cfg.method != "step_by_step" and cfg.evaluation.data is None:
        data.eval = []
    return data


def eval_rows(cfg, data: DistillData) -> list[dict]:
    """Held-out rows for answer accuracy: evaluation.data, else step_by_step's labelled validation rows."""
    from rayapp.evaluation import load_eval_rows

    e = cfg.evaluation
    if e.data:
        return load_eval_rows(e.data, e.max_examples, cfg.task_type)
    return data.eval[: e.max_examples] if e.max_examples else data.eval
