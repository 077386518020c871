"""`kind: batch` on Ray Data with the vLLM CPU engine (tiny model): every row exactly once,
bad rows counted, and a run killed mid-way finishes on re-run without duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 300


def _write_input(path: Path) -> None:
    lines = []
    for i in range(N_GOOD):
        if i % 3 == 0:
            row = {"id": f"r{i}", "messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
        else:
            row = {"id": f"r{i}", "input_text": f"Story {i}: once upon a time"}
        lines.append(json.dumps(row))
    lines.insert(10, json.dumps({"id": "empty", "input_text": "   "}))
    lines.insert(50, "{not json")
    lines.insert(90, json.dumps({"id": "long", "input_text": "word " * 400}))
    lines.insert(130, json.dumps({"id": "nofield", "text": "wrong key"}))
    path.write_text("\n".join(lines) + "\n")


def _job(tmp_path: Path, out: str, **extra) -> Path:
    job = {
        "kind": "batch", "name": "batch_test", "task": "generate", "model": {"path": "tiny"},
        "input": str(tmp_path / "in.jsonl"), "chat": "auto",
        "engine": {"max_model_len": 128, "max_num_seqs": 32, "kv_cache_gib": 1, "cpus_per_engine": 1},
        "concurrency": [1, 2], "sampling": {"temperature": 1.0, "max_tokens": 24, "seed": 0},
        "batch_size": 16, "rows_per_shard": 32, "output_dir": str(tmp_path / out), **extra,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _check_every_row_once(out: Path) -> dict:
    rows = read_jsonl(out / "output.jsonl")
    rejects = read_jsonl(out / "rejects.jsonl")
    ids = Counter(r["id"] for r in rows)
    assert max(ids.values()) == 1, "duplicated rows"
    assert set(ids) == {f"r{i}" for i in range(N_GOOD)}, "lost rows"
    assert all(r["output_text"] is not None and r["finish_reason"] in ("stop", "length") for r in rows)
    assert Counter(r["reason"] for r in rejects) == {"empty_prompt": 1, "bad_row": 2, "prompt_too_long": 1}
    assert sorted(r["row"] for r in rejects) == [10, 50, 90, 130]
    assert all(r["where"].endswith(f":{r['row'] + 1}") for r in rejects)  # file:line of the input
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == N_GOOD and stats["rows_in"] == N_GOOD + 4
    return stats


def test_batch_job_writes_every_row_exactly_once(ray_cluster, tiny_model_dir, tmp_path):
    from rayapp.teachers.batch import run

    _write_input(tmp_path / "in.jsonl")
    cfg = load_job(_job(tmp_path, "out"))
    summary = run(cfg)
    assert summary["written"] == N_GOOD and summary["rejected"] == 4 and summary["shards"] == 10
    _check_every_row_once(tmp_path / "out")
    chat_rows = read_jsonl(tmp_path / "out" / "output.jsonl")
    assert chat_rows[0]["teacher"] == {"model": "tiny", "template": "chat", "sampling": cfg.sampling.model_dump()}
    print(f"batch job: {summary['rows_per_s']} rows/s over {summary['rows_generated']} rows")
    # A second run finds every shard written and generates nothing.
    again = run(cfg)
    assert again["shards_skipped"] == 10 and again["rows_generated"] == 0
    _check_every_row_once(tmp_path / "out")
    # Changing what the shards depend on is refused instead of mixing outputs.
    from rayapp.teachers.batch import BatchResumeError

    with pytest.raises(BatchResumeError, match="sampling"):
        run(load_job(_job(tmp_path, "out"), ["sampling.max_tokens=5"]))


def test_killed_batch_job_resumes_without_duplicates(ray_cluster, tiny_model_dir, tmp_path):
    from rayapp.teachers.batch import run

    _write_input(tmp_path / "in.jsonl")
    job = _job(tmp_path, "killed", batch_size=8, concurrency=[1, 1], sampling={"temperature": 1.0, "max_tokens": 96, "seed": 0})
    shards = tmp_path / "killed" / "shards"
    # The first run is a separate driver on this test's cluster; kill it after a few shards.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rayapp.cli", "run", str(job)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(list(shards.glob("shard-*[0-9].jsonl"))) < 2 and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written_before = sorted(p.name for p in shards.glob("shard-*[0-9].jsonl"))
    assert 2 <= len(written_before) < 10, f"kill landed outside the run: {written_before}"
    assert not (tmp_path / "killed" / "output.jsonl").exists()
    before = {name: (shards / name).read_text() for name in written_before}

    summary = run(load_job(job))
    assert summary["shards_skipped"] == len(written_before)
    assert all((shards / name).read_text() == text for name, text in before.items())  # kept as they were
    _check_every_row_once(tmp_path / "killed")
