"""Distillation data, built on the driver before any worker starts: the items, their collation, and
what every method's data shares. Each method module builds its own (``build_data``).

Bad rows follow ``data.on_bad_rows`` (stop with file:line: field: reason, or drop and count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from rayapp.algorithms import IGNORE_INDEX
from rayapp.data.stats import DatasetStats
from rayapp.errors import UserError


class DistillDataError(UserError, ValueError):
    pass


@dataclass
class DistillItem:
    """One training sequence, built by the method modules."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the response
    is_rationale: bool = False  # step_by_step: the explain task
    topk_ids: list[list[int]] | None = None  # logits: (len - 1, K) teacher top-k for the token after each position
    topk_logprobs: list[list[float]] | None = None  # (len - 1, K)
    prompt: str | None = None  # what the response answers (on-policy GKD samples the student on it)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DistillData:
    train: list[DistillItem]
    val: list[DistillItem] | None
    stats: dict
    p_label: float = 1.0  # step_by_step: share of supervised training tokens in each task
    p_rationale: float = 0.0
    layer_map: list | None = None  # features: [[student_layer, teacher_layer], ...]
    eval: list[dict] = field(default_factory=list)  # held-out rows {input_text, label} for answer accuracy
    notes: list[str] = field(default_factory=list)
    chat: bool = True  # the student's rows are rendered with its chat template

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


def collate_distill(items: list[DistillItem], pad_id: int, capacity: int | None = None) -> dict:
    """collate_sft's input_ids / attention_mask / labels (B, T), is_rationale (B,), and for logits
    topk_ids / topk_logprobs (B, T, K) (padding positions: token 0 at log-prob log(1/K), masked out).

    ``capacity`` (train.packing): the items packed into rows of at most that many tokens instead
    (:func:`rayapp.data.packing.collate_packed`: position_ids and segment_ids, no attention_mask),
    with is_rationale per token (R, L) and the top-k of each item at its tokens' places."""
    import torch

    from rayapp.data.collate import collate_sft
    from rayapp.data.packing import collate_packed, per_token

    if capacity:
        batch = collate_packed(items, pad_id, capacity)
        flags = torch.tensor([it.is_rationale for it in items], dtype=torch.bool)  # (B,)
        batch["is_rationale"] = per_token(flags, batch["segment_ids"], fill=False)  # (R, L)
        starts = batch["example_starts"].tolist()  # item -> (row, first column)
    else:
        batch = collate_sft(items, pad_id)
        batch["is_rationale"] = torch.tensor([it.is_rationale for it in items], dtype=torch.bool)  # (B,)
        starts = [(i, 0) for i in range(len(items))]
    if items[0].topk_ids is not None:
        R, T = batch["input_ids"].shape
        K = len(items[0].topk_ids[0])
        ids = torch.zeros((R, T, K), dtype=torch.long)
        lps = torch.full((R, T, K), -math.log(K), dtype=torch.float32)
        for i, it in enumerate(items):
            r, c = starts[i]
            n = len(it.topk_ids)
            ids[r, c : c + n] = torch.tensor(it.topk_ids, dtype=torch.long)
            lps[r, c : c + n] = torch.tensor(it.topk_logprobs, dtype=torch.float32)
        batch["topk_ids"], batch["topk_logprobs"] = ids, lps
    return batch


def encode_examples(cfg, tokenizer, triples: list[tuple[str, str, str]], where: str, is_rationale=lambda tag: False,
                    ) -> tuple[list[DistillItem], dict]:
    """(prompt, target, tag) triples as DistillItems with the SFT encoder (the item's ``prompt`` is
    the prompt); bad ones follow data.on_bad_rows. Returns (items, stats)."""
    from rayapp.data.formats import RowError, TextExample
    from rayapp.data.loaders import bad_rows_error
    from rayapp.data.tokenize import encode_example

    items, problems, truncated = [], [], 0
    for i, (prompt, target, tag) in enumerate(triples):
        try:
            enc = encode_example(tokenizer, TextExample(prompt, target), cfg.model.max_seq_len, cfg.data.chat_template, cfg.data.overlong)
        except RowError as e:
            problems.append(f"{where} #{i + 1} ({tag}): {e.field}: {e.reason}")
            continue
        truncated += int(enc.truncated)
        items.append(DistillItem(enc.input_ids, enc.labels, is_rationale=is_rationale(tag), prompt=prompt))
    if problems and cfg.data.on_bad_rows == "error":
        raise bad_rows_error(where, problems)
    return items, {"examples": len(items), "dropped": len(problems), "truncated": truncated}


def sft_items(cfg, tokenizer) -> DistillData:
    """Tuning rows (text or chat, as for sft) as DistillItems that know their prompt."""
    from rayapp.data.sft import load_sft_splits

    train, val = load_sft_splits(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed)
    stats = {"train": train.stats.to_dict(), "validation": val.stats.to_dict() if val else None}

    def items(ds):
        return [DistillItem(e.input_ids, e.labels, prompt=p) for e, p in zip(ds.examples, ds.prompts, strict=True)]

    return DistillData(items(train), items(val) if val else None, stats)


def check_same_vocab(cfg, tokenizer, teacher_dir: str | None) -> None:
    """Methods that compare teacher and student token by token need one tokenizer."""
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


def eval_rows(cfg, data: DistillData) -> list[dict]:
    """Held-out rows for answer accuracy: evaluation.data, else step_by_step's labelled validation rows."""
    from rayapp.evaluation import load_eval_rows

    e = cfg.evaluation
    if e.data:
        return load_eval_rows(e.data, e.max_examples, cfg.task_type)
    return data.eval[: e.max_examples] if e.max_examples else data.eval
