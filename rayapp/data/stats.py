"""Dataset statistics: rows read, examples kept, dropped rows by reason, truncation and token counts.

``DatasetStats.format()`` is the small aligned table ``rayapp validate`` prints and the job report
shows; ``to_dict()`` is what goes into JSON outputs.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

MAX_SAMPLES = 20  # bad-row messages kept for the report when rows are dropped
TOKEN_FIELDS = ("truncated", "total_tokens", "supervised_tokens", "token_lengths")  # meaningful once tokenized


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list: always one of the values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class DatasetStats:
    source: str = ""
    rows: int = 0  # rows read, bad ones included
    examples: int = 0  # rows kept
    drop_reasons: Counter = field(default_factory=Counter)  # kind of bad row -> count
    bad_rows: list[str] = field(default_factory=list)  # first MAX_SAMPLES "file:line: field: reason"
    truncated: int = 0  # token sequences cut at max_seq_len (a pair can add two)
    total_tokens: int = 0
    supervised_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)  # tokens per kept sequence

    @property
    def dropped(self) -> int:
        return sum(self.drop_reasons.values())

    def add_bad_row(self, kind: str, message: str) -> None:
        self.drop_reasons[kind] += 1
        if len(self.bad_rows) < MAX_SAMPLES:
            self.bad_rows.append(message)

    def add_example(self, *encoded) -> None:
        """Count one kept example; each Encoded given (one, or a chosen/rejected pair) adds its tokens."""
        self.examples += 1
        for e in encoded:
            if e is None:
                continue
            self.lengths.append(len(e.input_ids))
            self.total_tokens += len(e.input_ids)
            self.supervised_tokens += e.num_supervised
            self.truncated += int(e.truncated)

    def token_lengths(self) -> dict[str, float] | None:
        if not self.lengths:
            return None
        return {
            "min": min(self.lengths),
            "median": statistics.median(self.lengths),
            "p95": percentile(self.lengths, 95),
            "max": max(self.lengths),
        }

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "rows": self.rows,
            "examples": self.examples,
            "dropped": self.dropped,
            "drop_reasons": dict(sorted(self.drop_reasons.items())),
            "truncated": self.truncated,
            "total_tokens": self.total_tokens,
            "supervised_tokens": self.supervised_tokens,
            "token_lengths": self.token_lengths(),
        }

    @staticmethod
    def format_line(d: dict) -> str:
        """One line from ``to_dict()``'s form: "rows 5, examples 4, dropped 1, ...". As in format(),
        token counts only when something was tokenized (raw input files are read, not tokenized)."""
        counted = d.get("token_lengths") is not None
        return ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, (dict, list))
                         and (counted or k not in TOKEN_FIELDS))

    def format(self) -> str:
        """An aligned two-column table, e.g. for `rayapp validate` and report.html."""
        rows: list[tuple[str, str]] = [("rows read", str(self.rows)), ("examples", str(self.examples))]
        dropped = str(self.dropped)
        if self.drop_reasons:
            dropped += "  (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.drop_reasons.items())) + ")"
        rows.append(("dropped", dropped))
        lengths = self.token_lengths()
        if lengths is not None:
            share = self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
            median = lengths["median"]
            median_text = f"{median:g}"
            rows += [
                ("truncated", str(self.truncated)),
                ("tokens", str(self.total_tokens)),
                ("supervised tokens", f"{self.supervised_tokens}  ({share:.1%})"),
                ("tokens min/median/p95/max", f"{lengths['min']} / {median_text} / {lengths['p95']} / {lengths['max']}"),
            ]
        width = max(len(k) for k, _ in rows)
        lines = [self.source] if self.source else []
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines)
