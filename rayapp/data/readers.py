"""Read rows from JSONL, parquet and saved ``datasets`` directories, keeping where each row came from.

Every row comes back as a :class:`Row` with its file and 1-based line (JSONL) or row
number (parquet / datasets), so a bad row can be reported as ``file:line: field: reason``.
A JSONL line that cannot be used comes back as a Row with ``error`` (and ``error_field``) set
instead of raising, so the caller decides whether to stop or drop it: not UTF-8, not JSON (bad
syntax, a number over Python's 4300 digits, nesting deeper than the parser's recursion limit), not
an object, or a string holding an unpaired UTF-16 surrogate (``"\\ud800"`` parses, but no UTF-8
file, tokenizer or Arrow table can hold it).

Lines are split on ``\\n`` only, as ``wc -l``, ``sed -n`` and ``grep -n`` count them: a raw CR,
U+0085, U+2028 or U+2029 inside a line does not start a new one. A UTF-8 byte-order mark before the
first line is skipped. Blank means JSON whitespace only (space, tab, CR): a line of other white
space (U+2028, U+0085, ...) is a malformed row, not a silently skipped one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rayapp.data.formats import show_value
from rayapp.errors import UserError


@dataclass
class Row:
    source: str  # file or directory the row came from
    line: int  # 1-based line (JSONL) or row number (parquet, datasets)
    data: dict = field(default_factory=dict)
    error: str | None = None  # set when the row could not be parsed at all
    error_field: str = "row"  # where in the row the error is ("row": the line as a whole)

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


_JSON_BLANK = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
# A \uD800-\uDFFF escape in the raw text: the only way an unpaired surrogate gets into a parsed row.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_jsonl(p: Path) -> Iterator[Row]:
    with open(p, "rb") as f:  # binary: split on b"\n" only, decode each line on its own
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip(_JSON_BLANK):
                continue
            data, field, error = parse_jsonl_line(raw)
            yield Row(str(p), i, data if error is None else {}, error, field)


def parse_jsonl_line(raw: bytes) -> tuple[dict, str, str | None]:
    """(data, error_field, error) for one JSONL line; error is None when the line is a usable object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return {}, "row", (f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line "
                           "(save the file as UTF-8)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, "row", f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    except RecursionError:
        return {}, "row", "malformed JSON (nested too deeply to read)"
    except ValueError as e:  # e.g. an integer of more than 4300 digits (sys.get_int_max_str_digits)
        reason = "a number too long to read" if "digits" in str(e) else str(e)[:200]
        return {}, "row", f"malformed JSON ({reason})"
    if not isinstance(data, dict):
        return {}, "row", f"expected a JSON object, found {type(data).__name__}"
    if _SURROGATE_ESCAPE.search(raw):
        found = _find_surrogate(data, "")
        if found is not None:
            path, where, char = found
            return {}, path or "row", (f"unpaired UTF-16 surrogate \\u{ord(char):04x} in the {where}: not valid "
                                       "Unicode; write the character itself, or a surrogate pair")
    return data, "row", None


def _find_surrogate(value, path: str) -> tuple[str, str, str] | None:
    """(field path, 'text' or 'key', the surrogate) of the first unpaired surrogate inside ``value``."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (path, f"text at character {m.start() + 1}", m.group()) if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            m = _SURROGATE.search(k)
            if m:
                return (path, "key " + show_value(k), m.group())
            name = k if len(k) <= 40 else k[:40] + "\u2026"  # not "...": dots separate the path
            found = _find_surrogate(v, f"{path}.{name}" if path else name)
            if found:
                return found
    elif isinstance(value, list):
        for n, v in enumerate(value):
            found = _find_surrogate(v, f"{path}[{n}]")
            if found:
                return found
    return None


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
