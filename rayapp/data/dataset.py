"""`kind: dataset` — a task with checkable answers built offline from reasoning-gym.

Writes into output_dir (atomically, deterministic for a seed), beside config.resolved.yaml:
  train.jsonl      {input_text, output_text: label, rationale, task_type}   labeled set (distillation input)
  train_cot.jsonl  {input_text, output_text: "<rationale> So the answer is <label>."}   teacher tuning
  unlabeled.jsonl  {input_text, task_type}                                   pool the teacher labels
  test.jsonl       {input_text, output_text: label, task_type}               held-out evaluation
  pool.jsonl       train (with labels) + unlabeled (without): what a teacher labels and explains
A gold rationale is derived from the generator's metadata where it carries the expression
(chain_sum, basic_arithmetic: left-to-right steps "3 + 5 = 8. 8 - 2 = 6."); otherwise rows have
no gold rationale and train_cot.jsonl holds the bare answers.
"""

from __future__ import annotations

import re
from pathlib import Path

from rayapp.data.formats import ANSWER_MARKER
from rayapp.data.readers import write_jsonl_atomic
from rayapp.errors import UserError

_TERM = re.compile(r"\s*([+-])\s*(\d+)")


class DatasetBuildError(UserError, ValueError):
    pass


def chain_rationale(expression: str) -> str | None:
    """'12 + 5 - 3' -> '12 + 5 = 17. 17 - 3 = 14.' for +/- chains evaluated left to right; else None."""
    m = re.match(r"\s*(-?\d+)", expression)
    if not m:
        return None
    value = int(m.group(1))
    rest = expression[m.end():]
    steps = []
    pos = 0
    for t in _TERM.finditer(rest):
        if t.start() != pos:
            return None
        op, num = t.group(1), int(t.group(2))
        new = value + num if op == "+" else value - num
        steps.append(f"{value} {op} {num} = {new}.")
        value = new
        pos = t.end()
    if pos != len(rest.rstrip()) or not steps:
        return None
    return " ".join(steps)


def _question(item: dict) -> str:
    q = item["question"]
    q = q.replace("State the final answer to the following arithmetic problem: ", "What is ").rstrip()
    q = re.sub(r"\s*=\s*$", "?", q)
    return q.replace(" Give the result as your final answer. Do not include units.", "").strip()


def build_rows(cfg) -> dict[str, list[dict]]:
    import reasoning_gym

    sizes = cfg.sizes
    total = sizes.train + sizes.unlabeled + sizes.test
    # Over-generate: duplicates are dropped so that no question appears in two splits.
    try:
        items = list(reasoning_gym.create_dataset(cfg.dataset, size=total * 3, seed=cfg.seed, **cfg.options))
    except (TypeError, ValueError, KeyError) as e:
        raise DatasetBuildError(f"dataset '{cfg.dataset}' with options {cfg.options}: reasoning-gym refused it: {e}") from e
    seen, rows = set(), []
    for item in items:
        q = _question(item)
        if q in seen:
            continue
        seen.add(q)
        expr = (item.get("metadata") or {}).get("expression")
        rows.append({"input_text": q, "label": str(item["answer"]), "rationale": chain_rationale(expr) if expr else None})
        if len(rows) == total:
            break
    if len(rows) < total:
        raise DatasetBuildError(
            f"dataset '{cfg.dataset}' gave only {len(rows)} distinct questions, {total} needed "
            "(train + unlabeled + test); lower sizes or widen options (more terms or digits)"
        )
    train = rows[: sizes.train]
    unlabeled = rows[sizes.train : sizes.train + sizes.unlabeled]
    test = rows[sizes.train + sizes.unlabeled :]
    tt = "number"
    return {
        "train": [{"input_text": r["input_text"], "output_text": r["label"], "rationale": r["rationale"], "task_type": tt} for r in train],
        "train_cot": [
            {"input_text": r["input_text"], "output_text": f"{r['rationale'] + ' ' if r['rationale'] else ''}{ANSWER_MARKER} {r['label']}."}
            for r in train
        ],
        "unlabeled": [{"input_text": r["input_text"], "task_type": tt} for r in unlabeled],
        "test": [{"input_text": r["input_text"], "output_text": r["label"], "task_type": tt} for r in test],
        # Everything the teacher sees: labeled rows keep their gold label (for its gold filter).
        "pool": [{"input_text": r["input_text"], "output_text": r["label"], "task_type": tt} for r in train]
        + [{"input_text": r["input_text"], "task_type": tt} for r in unlabeled],
    }


def validate(cfg) -> str:
    rows = build_rows(cfg)
    return "\n".join(f"{name}: {len(r)} rows" for name, r in rows.items())


def run(cfg) -> dict:
    from rayapp.config.loader import write_resolved_config

    out = Path(cfg.output_dir)
    rows = build_rows(cfg)
    write_resolved_config(cfg, out)
    summary = {}
    for name, split in rows.items():
        n = write_jsonl_atomic(out / f"{name}.jsonl", split)
        summary[name] = f"{out / f'{name}.jsonl'} ({n} rows)"
    example = rows["train_cot"][0] if rows["train_cot"] else None
    if example:
        print(f"[{cfg.name}] e.g. {example['input_text']!r} -> {example['output_text']!r}", flush=True)
    return summary
