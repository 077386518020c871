"""Load a data file into typed records with the bad-row policy every job shares.

A bad row is never skipped silently. With ``data.on_bad_rows: error`` every bad row is collected
as ``file:line: field: reason`` and :class:`DataError` lists them (the first 20 and a count) before
anything trains; with ``drop`` they are skipped and counted by kind in :class:`DatasetStats`.

``load_preference_pairs``, ``load_prompts``, ``load_distill_inputs`` and ``load_teacher_outputs``
return ``(records, stats)``; tuning data goes through :func:`rayapp.data.sft.load_sft_dataset`.
``data_cfg`` is any config section with ``on_bad_rows`` / ``max_rows`` (DataConfig), or None for
the defaults (error, all rows).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import TypeVar

from rayapp.data.formats import (
    MALFORMED,
    DistillInput,
    PreferencePair,
    PromptRecord,
    RowError,
    TeacherOutput,
    parse_distill_input,
    parse_preference,
    parse_prompt,
    parse_teacher_output,
)
from rayapp.data.readers import read_rows
from rayapp.data.stats import DatasetStats
from rayapp.errors import UserError

T = TypeVar("T")
SHOWN = 20  # bad rows listed in a DataError


class DataError(UserError, ValueError):
    """Bad rows (or no usable rows) in a data file, each as ``file:line: field: reason``."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message)


def bad_rows_error(path: str, problems: list[str]) -> DataError:
    shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return DataError(
        f"{path}: {len(problems)} bad row{'s' if len(problems) != 1 else ''} (data.on_bad_rows: error), "
        f"stopping before training:\n{shown}{more}\n"
        "fix these rows, or set data.on_bad_rows: drop to skip them (they are counted in the dataset stats)",
        problems,
    )


def encoded_parts(record) -> list:
    """The token sequences inside a parsed record, for the stats: an Encoded itself, or the
    Encoded values of a dict / tuple (a chosen/rejected pair); none for untokenized records."""
    if hasattr(record, "input_ids"):
        return [record]
    values = record.values() if isinstance(record, dict) else record if isinstance(record, (tuple, list)) else ()
    return [v for v in values if hasattr(v, "input_ids")]


def load_records(path: str | os.PathLike, parse: Callable[[dict], T], data_cfg=None, what: str = "rows") -> tuple[list[T], DatasetStats]:
    """Parse every row of ``path`` with ``parse`` (which raises RowError), applying the bad-row policy.

    ``parse`` may return an Encoded (or a dict / tuple of them, e.g. a chosen/rejected pair) to have
    its tokens counted.
    Raises DataError when bad rows are found under ``on_bad_rows: error``, or no row is usable."""
    on_bad_rows = getattr(data_cfg, "on_bad_rows", "error")
    max_rows = getattr(data_cfg, "max_rows", None)
    stats = DatasetStats(source=str(path))
    records: list[T] = []
    problems: list[str] = []
    for row in read_rows(path, max_rows):
        stats.rows += 1
        try:
            if row.error is not None:
                raise RowError(row.error_field, row.error, MALFORMED)
            record = parse(row.data)
        except RowError as e:
            message = f"{row.where}: {e.field}: {e.reason}"
            problems.append(message)
            stats.add_bad_row(e.kind, message)
            continue
        records.append(record)
        stats.add_example(*encoded_parts(record))
    if problems and on_bad_rows == "error":
        raise bad_rows_error(str(path), problems)
    if not records:
        why = f"all {stats.rows} rows are bad (first: {problems[0]})" if problems else "it holds no rows"
        raise DataError(f"{path}: no usable {what}: {why}; check the file and data.format", problems)
    return records, stats


def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (train, validation) index lists, each in file order.

    Holds out ``round(n * fraction)`` items, at least one when ``fraction > 0`` and ``n >= 2``."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def load_preference_pairs(path: str | os.PathLike, data_cfg=None) -> tuple[list[PreferencePair], DatasetStats]:
    """Preference pairs for reward models and DPO."""
    return load_records(path, parse_preference, data_cfg, "preference pairs")


def load_prompts(path: str | os.PathLike, data_cfg=None) -> tuple[list[PromptRecord], DatasetStats]:
    """Prompts for RL rollouts and batch generation (extra keys such as a gold label are kept)."""
    return load_records(path, parse_prompt, data_cfg, "prompts")


def load_distill_inputs(path: str | os.PathLike, data_cfg=None) -> tuple[list[DistillInput], DatasetStats]:
    """Distillation inputs: input_text with an optional gold label (output_text)."""
    return load_records(path, parse_distill_input, data_cfg, "distillation inputs")


def load_teacher_outputs(path: str | os.PathLike, data_cfg=None) -> tuple[list[TeacherOutput], DatasetStats]:
    """Teacher-labelled rows (label, rationale, teacher {model, template, sampling}) from a batch job."""
    return load_records(path, parse_teacher_output, data_cfg, "teacher outputs")
