"""Rationale generation for distilling step-by-step (Hsieh et al., 2023).

For each input question the teacher is prompted with a few-shot chain-of-thought template;
each completion is split into (rationale, label) by :func:`parse_rationale`. With
``self_consistency_n`` > 1, n completions are sampled per question and the majority label
wins (Wang et al., 2022); the rationale kept is the first one that reached that label.
When the input carries a gold label, ``gold_filter`` drops (``"drop"``) or marks
(``"flag"``: ``gold_match: false``) rows whose teacher label disagrees.

Departure from the paper: it keeps only the rationale and trains on gold labels; we keep
the teacher's label too (``label``) and record the gold one as ``gold_label``, so the
student recipe can choose.

Nothing is dropped silently: every question that yields no row is listed in
``stats["rejects"]`` with its index and reason, and counted in ``stats``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rayapp.config.base import SamplingConfig
from rayapp.errors import UserError
from rayapp.teachers import Completion, Generator
from rayapp.teachers.templates import PromptTemplate, answers_match, parse_rationale

GOLD_FILTERS = ("drop", "flag", "off")
REJECT_REASONS = ("empty_prompt", "prompt_too_long", "unparsable", "empty_rationale", "gold_mismatch")


class RationaleConfigError(UserError, ValueError):
    pass


def _as_input(item: Any) -> dict:
    if isinstance(item, str):
        return {"input_text": item}
    if isinstance(item, dict):
        return item
    return {"input_text": item.input_text, "output_text": item.label, **getattr(item, "extra", {})}


def _gold(row: dict) -> str | None:
    for key in ("output_text", "label"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return None


def majority(labels: list[str | None]) -> tuple[str | None, int]:
    """The most frequent non-None label (ties: the one seen first) and its count."""
    votes = Counter(lab for lab in labels if lab is not None)
    if not votes:
        return None, 0
    first = {lab: labels.index(lab) for lab in votes}
    best = max(votes, key=lambda lab: (votes[lab], -first[lab]))
    return best, votes[best]


def new_stats() -> dict[str, Any]:
    stats: dict[str, Any] = {"inputs": 0, "written": 0, "completions": 0, "unparsable_completions": 0, "truncated_completions": 0, "gold_checked": 0, "gold_agree": 0, "gold_flagged": 0}
    stats.update({reason: 0 for reason in REJECT_REASONS})
    stats["rejects"] = []
    return stats


def merge_stats(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if key == "rejects":
            total.setdefault("rejects", []).extend(value)
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
    return total


def generate_rationales(
    pool: Generator,
    inputs: list,
    template: PromptTemplate,
    sampling: SamplingConfig | None = None,
    self_consistency_n: int = 1,
    gold_filter: str = "drop",
    chat: bool = True,
    teacher_model: str | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    """Label ``inputs`` (dicts with input_text and optional output_text/label, or strings) with
    rationales. Returns teacher-output rows (DESIGN.md) and stats (counts plus ``rejects``)."""
    sampling = sampling or SamplingConfig()
    if gold_filter not in GOLD_FILTERS:
        raise RationaleConfigError(f"gold_filter '{gold_filter}': expected one of {', '.join(GOLD_FILTERS)}")
    if self_consistency_n > 1 and sampling.temperature == 0:
        raise RationaleConfigError(
            f"self_consistency_n={self_consistency_n} with sampling.temperature=0 gives n identical answers; "
            "set sampling.temperature > 0 (e.g. 0.7) or self_consistency_n: 1"
        )
    rows_in = [_as_input(x) for x in inputs]
    prompts = [template.render(str(r.get("input_text") or ""), chat) if str(r.get("input_text") or "").strip() else "" for r in rows_in]
    sampling = sampling.model_copy(update={"n": self_consistency_n})
    completions = pool.generate(prompts, sampling)
    by_prompt: dict[int, list[Completion]] = {}
    for c in completions:
        by_prompt.setdefault(c.prompt_index, []).append(c)

    teacher = {"model": teacher_model or str(getattr(pool, "model_path", "unknown")), "template": template.label, "sampling": sampling.model_dump()}
    stats = new_stats()
    stats["inputs"] = len(rows_in)
    out: list[dict] = []

    def reject(i: int, reason: str, detail: str) -> None:
        stats[reason] += 1
        stats["rejects"].append({"index": i, "reason": reason, "detail": detail[:300]})

    for i, row in enumerate(rows_in):
        cands = by_prompt.get(i, [])
        if not cands or cands[0].error:
            reason = cands[0].finish_reason if cands else "empty_prompt"
            reject(i, reason if reason in REJECT_REASONS else "empty_prompt", cands[0].error if cands else "no completion")
            continue
        stats["completions"] += len(cands)
        parsed = [parse_rationale(c.text, template.task_type) for c in cands]
        stats["unparsable_completions"] += sum(label is None for _, label in parsed)
        stats["truncated_completions"] += sum(c.finish_reason == "length" for c in cands)
        label, votes = majority([lab for _, lab in parsed])
        if label is None:
            reject(i, "unparsable", f"no answer marker in {len(cands)} completion(s); first: {cands[0].text!r}")
            continue
        rationale = next(r for r, lab in parsed if lab == label)
        if not rationale:
            reject(i, "empty_rationale", f"label {label!r} without reasoning: {cands[0].text!r}")
            continue
        gold = _gold(row)
        match = None
        if gold is not None and gold_filter != "off":
            stats["gold_checked"] += 1
            match = answers_match(label, gold, template.task_type)
            stats["gold_agree"] += int(match)
            if not match and gold_filter == "drop":
                reject(i, "gold_mismatch", f"teacher said {label!r}, gold label is {gold!r}")
                continue
            stats["gold_flagged"] += int(not match)
        extra = {k: v for k, v in row.items() if k not in ("input_text", "output_text", "label", "rationale", "teacher")}
        result = {"input_text": row["input_text"], "label": label, "rationale": rationale, "teacher": teacher, **extra}
        if gold is not None:
            result["gold_label"] = gold
            result["gold_match"] = match
        if self_consistency_n > 1:
            result["agreement"] = votes / len(cands)
        out.append(result)
    stats["written"] = len(out)
    return out, stats


def format_stats(stats: dict) -> str:
    """A few lines for the job summary."""
    lines = [f"inputs {stats['inputs']}, rows written {stats['written']}"]
    rejected = {r: stats[r] for r in REJECT_REASONS if stats.get(r)}
    if rejected:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in rejected.items()))
    if stats.get("gold_checked"):
        lines.append(f"teacher agrees with gold on {stats['gold_agree']}/{stats['gold_checked']}")
    lines.append(f"completions {stats['completions']} ({stats['unparsable_completions']} unparsable, {stats['truncated_completions']} truncated)")
    return "\n".join(lines)
