"""Read rows from JSONL, parquet and saved ``datasets`` directories, keeping where each row came from.

Every row comes back as a :class:`Row` with its file and 1-based line (JSONL) or row
number (parquet / datasets), so a bad row can be reported as ``file:line: field: reason``.
A JSONL line that is not valid JSON comes back as a Row with ``error`` set instead of
raising, so the caller decides whether to stop or drop it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.errors import UserError


@dataclass
class Row:
    source: str  # file or directory the row came from
    line: int  # 1-based line (JSONL) or row number (parquet, datasets)
    data: dict = field(default_factory=dict)
    error: str | None = None  # set when the row could not be parsed at all

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class DataFileError(UserError, ValueError):
    """The data file itself cannot be read (missing, unknown format)."""


def detect_format(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "datasets"
        raise DataFileError(f"{p}: a directory, but not a saved `datasets` directory (no dataset_info.json / state.json)")
    suffixes = "".join(p.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".json")):
        return "jsonl"
    if suffixes.endswith(".parquet"):
        return "parquet"
    raise DataFileError(f"{p}: unknown data format '{p.suffix}' (expected .jsonl, .parquet or a saved datasets directory)")


def read_rows(path: str | os.PathLike, max_rows: int | None = None) -> Iterator[Row]:
    """Yield every row of ``path``; blank JSONL lines are skipped (they are not rows)."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: file not found")
    fmt = detect_format(p)
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "datasets": _read_datasets}[fmt]
    for n, row in enumerate(reader(p)):
        if max_rows is not None and n >= max_rows:
            return
        yield row


def _read_jsonl(p: Path) -> Iterator[Row]:
    with open(p, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                yield Row(str(p), i, error=f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(data, dict):
                yield Row(str(p), i, error=f"expected a JSON object, found {type(data).__name__}")
                continue
            yield Row(str(p), i, data)


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    for i, data in enumerate(table.to_pylist(), start=1):
        yield Row(str(p), i, data)


def _read_datasets(p: Path) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, data in enumerate(ds, start=1):
        yield Row(str(p), i, dict(data))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file this project wrote (write_jsonl_atomic). Split on "\n" only:
    ``str.splitlines`` also splits at U+0085, U+2028 and U+2029, which json.dumps(ensure_ascii=False)
    leaves raw inside strings (a sampled completion held a U+0085 and broke a batch shard)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def write_jsonl_atomic(path: str | os.PathLike, rows) -> int:
    """Write ``rows`` (dicts) as JSONL through a temporary file renamed into place; returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return n
