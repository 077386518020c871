"""`kind: batch` at scale without an engine: 1,000,000 short rows through the real pipeline (the
streaming input index, Ray Data read tasks keyed by row number, the autoscaling actor stage,
the parquet parts sink with Ray Data's checkpoint, assembly of output.jsonl / rejects.jsonl /
stats.json) with the vLLM engine replaced by a trivial generation stage
(``TrivialGenerationStage``: each completion is the prompt reversed; it is recorded as the
teacher model in every output row, so nobody mistakes these rows for generated text).

What it measures: rows/s end to end, and the driver's peak RSS at 100,000 and at 1,000,000 rows,
each in a fresh driver process (``ru_maxrss`` of that process; Ray's own daemons and workers are
other processes). Before this pipeline every generated row streamed back to the driver, which
held each shard's rows until the shard was complete; now the driver holds a block list and a count,
so its memory should not grow with the rows: ``ratio`` = RSS(100k) / RSS(1M), ``target`` 0.8.

    .venv/bin/python bench/batch_scale.py [--rows 100000 1000000] [--replicas 2]

Prints a table and writes bench/results/batch_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE_NAME = "TrivialGenerationStage (no engine: the prompt reversed)"


class TrivialGenerationStage:
    """Stands in for the vLLM engine inside each replica: a completion per prompt, no model."""

    name = STAGE_NAME

    def __init__(self, model_dir: str, cfg) -> None:
        pass

    def generate(self, prompts, sampling):
        from rayapp.teachers import Completion

        return [Completion(p[::-1] if isinstance(p, str) else "", [1, 2, 3], "stop", prompt_index=i) for i, p in enumerate(prompts)]


def write_input(path: Path, rows: int) -> None:
    """Short prompt rows, and one bad line per 100,000 (they must land in the rejects)."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write("{not json\n" if i % 100_000 == 99_999 else json.dumps({"id": i, "input_text": f"what is {i} + 1?"}) + "\n")


def child(rows: int, out: Path, replicas: int) -> dict:
    """One run in this (fresh) driver process; returns its figures."""
    from rayapp.config import load_job_dict
    from rayapp.teachers.batch import run

    inp = out / "input.jsonl"
    write_input(inp, rows)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = load_job_dict({
        "kind": "batch", "name": f"batch_scale_{rows}", "task": "generate", "model": {"path": "tiny"}, "chat": "never",
        "input": str(inp), "on_bad_rows": "drop", "output_dir": str(out / "job"), "concurrency": [replicas, replicas],
        "engine": {"cpus_per_engine": 1}, "batch_size": 2000, "rows_per_shard": 20_000,
        "sampling": {"temperature": 0.0, "max_tokens": 8},
    })
    started = time.perf_counter()
    run(cfg, generator=TrivialGenerationStage)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    stats = json.loads((out / "job" / "stats.json").read_text())
    with open(out / "job" / "output.jsonl", "rb") as f:
        lines = sum(1 for _ in f)
    first = json.loads(open(out / "job" / "output.jsonl").readline())
    bad = rows // 100_000
    assert stats["rows_in"] == rows and stats["written"] == rows - bad == lines and stats.get("bad_row", 0) == bad, stats
    assert first["teacher"]["model"] == STAGE_NAME and first["output_text"] == first["input_text"][::-1]
    return {"rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds), "driver_peak_rss_mib": round(peak, 1),
            "driver_rss_before_run_mib": round(rss_before, 1), "parts": stats["parts"], "written": stats["written"],
            "rejected": rows - stats["written"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--replicas", type=int, default=2, help="generation stage actors (concurrency [n, n])")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.out), args.replicas)), flush=True)
        return

    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="batch_scale-") as tmp:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            env.pop("RAY_ADDRESS", None)  # a fresh in-process cluster per size: the driver is this child alone
            proc = subprocess.run([sys.executable, __file__, "--child", str(rows), "--out", tmp, "--replicas", str(args.replicas)],
                                  env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"run of {rows} rows failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            results.append(json.loads(line[len("RESULT "):]))
    print(f"\n{'rows':>9} {'seconds':>8} {'rows/s':>8} {'driver peak RSS MiB':>20} {'parts':>6}")
    for r in results:
        print(f"{r['rows']:>9} {r['seconds']:>8} {r['rows_per_s']:>8} {r['driver_peak_rss_mib']:>20} {r['parts']:>6}")
    by_rows = {r["rows"]: r for r in results}
    small, large = by_rows.get(100_000), by_rows.get(1_000_000)
    ratio = small["driver_peak_rss_mib"] / large["driver_peak_rss_mib"] if small and large else None
    result = {
        "ratio": ratio, "target": 0.8,
        "ratio_is": "driver peak RSS at 100,000 rows / at 1,000,000 rows (1.0: flat; the driver holds no rows)",
        "generation": STAGE_NAME, "replicas": args.replicas, "runs": results,
        "setup": "real kind: batch pipeline (input index, Ray Data read tasks, CheckpointFilter, actor stage, parquet parts sink "
                 "with CheckpointConfig, assembly task) on an in-process local Ray cluster, shared 2-core machine",
    }
    if ratio is not None:
        print(f"\nratio RSS(100k)/RSS(1M) = {ratio:.3f} (target >= 0.8); 1M rows at {large['rows_per_s']} rows/s")
    dest = ROOT / "bench" / "results" / "batch_scale.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
