"""README's benchmark table is the one scripts/bench_table.py makes from bench/results/*.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "scripts" / "bench_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_matches_the_results():
    assert _script().main(["--check"]) == 0, "README's benchmark table is stale: run scripts/bench_table.py"


def test_rows_say_whether_each_target_is_met(tmp_path):
    (tmp_path / "fast.json").write_text(json.dumps({"ratio": 1.17, "target": 1.0}))
    (tmp_path / "slow.json").write_text(json.dumps({"ratio": 0.87, "target": 0.95, "sync_share": 0.056, "sync_share_goal": 0.02}))
    (tmp_path / "no_pair.json").write_text(json.dumps({"seconds": 3}))
    rows = _script().rows(tmp_path)
    assert len(rows) == 4  # header, rule, two results; a file without a headline pair is left out
    assert rows[2].startswith("| `fast` |") and "| 1.17 | 1.0 | yes |" in rows[2]
    assert rows[3].startswith("| `slow` |") and "| 0.87 | 0.95 | **no** |" in rows[3] and "0.056 (<= 0.02)" in rows[3]
