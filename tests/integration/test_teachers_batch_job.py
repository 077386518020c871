"""`kind: batch` on Ray Data with the vLLM CPU engine (tiny model): every row exactly once, bad rows
counted; a driver killed mid-way finishes on re-run without duplicates (Ray Data's checkpoint skips
the committed rows); an engine replica killed mid-way is replaced and its rows redone; output to
an S3 URI (moto) written by the replicas themselves."""

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


def _committed(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoint").glob("*.parquet") if not p.name.endswith(".pending.parquet"))


def _committed_rows(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in _committed(out))


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "parts").glob("*.parquet")}


def _replicas(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {r for p in (out / "parts").glob("*.parquet") for r in pq.read_table(p, columns=["replica"])["replica"].to_pylist()}


def _driver(ray_cluster, job: Path) -> subprocess.Popen:
    """`rayapp run job` as a separate driver on this test's cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "rayapp.cli", "run", str(job)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_commits(out: Path, proc: subprocess.Popen, n: int, timeout: float = 900) -> None:
    """Until ``n`` parts are committed (the engine starts in 25-40 s here, minutes on a loaded machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(_committed(out)) < n and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended before {n} parts were committed:\n{proc.stdout.read()[-3000:]}"
    assert len(_committed(out)) >= n, f"no {n} parts committed within {timeout:.0f} s"


@pytest.fixture()
def idle_cluster(ray_cluster):
    """The session cluster with every CPU free. What these tests observe (a replacement replica, the
    pool's second replica, when parts commit) needs free CPUs: Ray releases the actors of a test
    that ended (Train workers, engines, a killed driver's replicas) asynchronously, and a replica or
    a write task left waiting for a CPU turns the check into a timing accident (the suite once saw
    the pool never scale up and an engine killed only after every row was generated)."""
    total = ray_cluster.cluster_resources().get("CPU", 0)
    start = time.time()
    deadline = start + 120
    while ray_cluster.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.5)
    free = ray_cluster.available_resources().get("CPU", 0)
    print(f"idle_cluster: {free:g} of {total:g} CPUs free after {time.time() - start:.1f} s")
    assert free >= total, f"{total - free:g} of the session cluster's {total:g} CPUs still held 120 s after the previous test"
    return ray_cluster


def _wait_for_the_killed_job_to_stop(out: Path, timeout: float = 120) -> None:
    """A SIGKILLed driver's Ray workers live on until the cluster notices the driver is gone, and
    until then a replica may still commit a part (CI once counted 64 rows here and the re-run found
    80). Wait until every replica that wrote a part has exited and the committed parts have stayed
    the same for 5 s; a part still being written counts as a writer alive. (The embedded cluster has
    no dashboard, hence no State API to ask.)"""
    import psutil
    import pyarrow as pa

    deadline = time.time() + timeout
    seen, since = None, time.time()
    while time.time() < deadline:
        parts = [p.name for p in _committed(out)]
        if parts != seen:
            seen, since = parts, time.time()
        try:
            pids = {int(r.split(":")[1]) for r in _replicas(out)}
        except pa.ArrowInvalid:  # a part still being written (no footer yet): its writer lives
            since = time.time()
            time.sleep(0.5)
            continue
        if not any(psutil.pid_exists(pid) for pid in pids) and time.time() - since >= 5:
            return
        time.sleep(0.5)
    raise AssertionError(f"the killed job's replicas still run {timeout:.0f} s after its driver was killed")


def test_batch_job_writes_every_row_exactly_once(ray_cluster, tiny_model_dir, tmp_path):
    from rayapp.teachers.batch import run

    _write_input(tmp_path / "in.jsonl")
    cfg = load_job(_job(tmp_path, "out"))
    summary = run(cfg)
    assert summary["written"] == N_GOOD and summary["rejected"] == 4 and summary["rows_generated"] == N_GOOD + 4
    assert summary["rows_skipped"] == 0 and summary["parts"] >= 1
    _check_every_row_once(tmp_path / "out")
    chat_rows = read_jsonl(tmp_path / "out" / "output.jsonl")
    assert chat_rows[0]["teacher"] == {"model": "tiny", "template": "chat", "sampling": cfg.sampling.model_dump()}
    assert [r["id"] for r in chat_rows] == [f"r{i}" for i in range(N_GOOD)]  # input order
    print(f"batch job: {summary['rows_per_s']} rows/s over {summary['rows_generated']} rows, {summary['parts']} parts")
    # A second run finds every row committed and generates nothing (no engine is started).
    again = run(cfg)
    assert again["rows_skipped"] == N_GOOD + 4 and again["rows_generated"] == 0
    _check_every_row_once(tmp_path / "out")
    # Changing what the rows depend on is refused instead of mixing outputs.
    from rayapp.teachers.batch import BatchResumeError

    with pytest.raises(BatchResumeError, match="sampling"):
        run(load_job(_job(tmp_path, "out"), ["sampling.max_tokens=5"]))


@pytest.mark.usefixtures("idle_cluster")
def test_killed_batch_job_resumes_without_duplicates(ray_cluster, tiny_model_dir, tmp_path):
    from rayapp.teachers.batch import run

    _write_input(tmp_path / "in.jsonl")
    job = _job(tmp_path, "killed", batch_size=8, concurrency=[1, 1], sampling={"temperature": 1.0, "max_tokens": 32, "seed": 0})
    out = tmp_path / "killed"
    proc = _driver(ray_cluster, job)
    try:
        _wait_for_commits(out, proc, 2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_for_the_killed_job_to_stop(out)
    done = _committed_rows(out)
    assert 2 <= len(_committed(out)) and done < N_GOOD + 4, f"kill landed outside the run: {done} rows committed"
    assert not (out / "output.jsonl").exists()
    before = {name: data for name, data in _parts(out).items() if name in {p.name for p in _committed(out)}}

    summary = run(load_job(job))
    assert summary["rows_skipped"] == done and summary["rows_generated"] == N_GOOD + 4 - done
    after = _parts(out)
    assert all(after[name] == data for name, data in before.items())  # committed parts kept as they were
    _check_every_row_once(out)


@pytest.mark.usefixtures("idle_cluster")
def test_killed_engine_replica_is_replaced_and_rows_appear_once(ray_cluster, tiny_model_dir, tmp_path):
    """SIGKILL the engine actor (with any process it spawned; on CPU the vLLM engine core runs inside it) once some rows are committed: Ray
    Data restarts the replica, runs its unfinished batches again, and the job ends with every row once."""
    import psutil
    import pyarrow.parquet as pq

    _write_input(tmp_path / "in.jsonl")
    # Two sequences at a time: generation takes long enough that the kill lands while the replica
    # still has batches to do (with 32 at a time it had sometimes produced every row before the
    # sink committed its second part, and no replacement was needed).
    job = _job(tmp_path, "engine_kill", batch_size=8, concurrency=[1, 1], sampling={"temperature": 1.0, "max_tokens": 32, "seed": 0},
               engine={"max_model_len": 128, "max_num_seqs": 2, "kv_cache_gib": 1, "cpus_per_engine": 1})
    out = tmp_path / "engine_kill"
    proc = _driver(ray_cluster, job)
    try:
        _wait_for_commits(out, proc, 1)
        first_part = next(p for p in (out / "parts").glob("*.parquet") if p.name in {c.name for c in _committed(out)})
        pid = int(pq.read_table(first_part, columns=["replica"])["replica"][0].as_py().split(":")[1])
        victim = psutil.Process(pid)
        family = [*victim.children(recursive=True), victim]  # the actor and any child (a GPU engine spawns its engine core)
        done_at_kill = _committed_rows(out)
        for p in family:
            p.kill()
        psutil.wait_procs(family, timeout=30)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-5000:]
    assert done_at_kill < N_GOOD + 4, f"the kill landed after the last row was written ({done_at_kill} rows)"
    replicas = _replicas(out)
    assert len(replicas) >= 2 and f":{pid}" in "".join(replicas), replicas  # rows from the killed replica and its replacement
    _check_every_row_once(out)
    print(f"engine killed after {done_at_kill} committed rows; replicas that wrote rows: {sorted(replicas)}")


def test_batch_output_to_s3_written_by_the_replicas(ray_cluster, s3_server, s3_bucket, tmp_path):
    """output_dir an s3:// URI: parts, checkpoint and the assembled files go to the bucket; a
    trivial generation stage stands in for the engine (what is tested is the sink and the checkpoint)."""
    from rayapp.storage import open_output
    from rayapp.teachers import PROMPT_TOO_LONG, Completion
    from rayapp.teachers.batch import run

    class Upper:  # defined here: cloudpickle sends it to the replicas by value
        name = "trivial-upper-stage"

        def __init__(self, model_dir, cfg):
            pass

        def generate(self, prompts, sampling):
            texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
            return [Completion(t.upper(), [1], "stop", prompt_index=i) if len(t) < 1000 else
                    Completion("", [], PROMPT_TOO_LONG, prompt_index=i, error="too long") for i, t in enumerate(texts)]

    _write_input(tmp_path / "in.jsonl")
    uri = f"s3://{s3_bucket}/runs/b"
    cfg = load_job(_job(tmp_path, "s3"), [f"output_dir={uri}", "rows_per_shard=50", "batch_size=25"])
    summary = run(cfg, generator=Upper)
    assert summary["written"] == N_GOOD and summary["output"] == f"{uri}/output.jsonl"
    keys = s3_server.keys(s3_bucket, "runs/b/")
    assert {"runs/b/output.jsonl", "runs/b/rejects.jsonl", "runs/b/stats.json", "runs/b/manifest.json"} <= set(keys)
    assert sum(k.startswith("runs/b/parts/") for k in keys) >= 2 and any(k.startswith("runs/b/checkpoint/") for k in keys)
    store = open_output(uri)
    local = tmp_path / "s3_copy"
    local.mkdir()
    for name in ("output.jsonl", "rejects.jsonl", "stats.json"):
        (local / name).write_bytes(store.read_bytes(name))
    _check_every_row_once(local)
    assert read_jsonl(local / "output.jsonl")[1]["output_text"] == "STORY 1: ONCE UPON A TIME"
    assert run(cfg, generator=Upper)["rows_generated"] == 0  # the checkpoint in the bucket says every row is done


@pytest.mark.usefixtures("idle_cluster")
def test_batch_pool_scales_from_min_to_max_replicas(ray_cluster, tmp_path, monkeypatch):
    """concurrency: [1, 2] is Ray Data's autoscaling actor pool, not a fixed one: rayapp hands Ray
    Data ActorPoolStrategy(min_size=1, max_size=2) (seen by a spy), the pool starts with one replica
    and adds the second only once the first is busy (Ray Data 2.60 scales up when a replica has
    max_tasks_in_flight = 2 blocks queued: utilization 2 >= 1.75), and both, never more, write rows.
    A slow trivial stage (1 s a block, 12 blocks) stands in for the engine, so no vLLM starts.
    What cannot be asserted on 2 cores: when the second replica arrives (its start-up competes with
    the first); a pool fixed at 2 would create both at once, which the order check below catches
    whenever the first replica has begun a block before the second exists."""
    import ray

    from rayapp.teachers import Completion
    from rayapp.teachers.batch import run

    events = tmp_path / "events.jsonl"

    class SlowStage:  # defined here: cloudpickle sends it (and `events`) to the replicas by value
        name = "slow-trivial-stage"

        def __init__(self, model_dir, cfg):
            with open(events, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "event": "init", "t": time.time()}) + "\n")

        def generate(self, prompts, sampling):
            with open(events, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "event": "generate", "t": time.time()}) + "\n")
            time.sleep(1.0)
            return [Completion("ok", [1], "stop", prompt_index=i) for i in range(len(prompts))]

    strategies = []

    class SpyStrategy(ray.data.ActorPoolStrategy):
        def __init__(self, **kw):
            strategies.append(kw)
            super().__init__(**kw)

    monkeypatch.setattr(ray.data, "ActorPoolStrategy", SpyStrategy)
    n = 96
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "input_text": f"Question {i}?"}) + "\n" for i in range(n)))
    cfg = load_job(_job(tmp_path, "scale"), ["rows_per_shard=8", "batch_size=8"])
    assert cfg.concurrency == [1, 2]
    summary = run(cfg, generator=SlowStage)
    assert summary["written"] == n
    assert [r["id"] for r in read_jsonl(tmp_path / "scale" / "output.jsonl")] == [f"r{i}" for i in range(n)]
    assert [(s["min_size"], s["max_size"]) for s in strategies] == [(1, 2)], strategies
    log = [json.loads(line) for line in events.read_text().splitlines()]
    inits = sorted((e for e in log if e["event"] == "init"), key=lambda e: e["t"])
    first_block = min(e["t"] for e in log if e["event"] == "generate")
    writers = {r.split(":")[1] for r in _replicas(tmp_path / "scale")}
    print(f"replica inits at +{[round(e['t'] - inits[0]['t'], 2) for e in inits]} s, first block at "
          f"+{first_block - inits[0]['t']:.2f} s; replicas that wrote rows: {sorted(writers)}")
    assert len(inits) == 2, inits  # scaled up to max, never past it
    assert inits[1]["t"] > first_block, "the second replica existed before the first had work: a fixed pool of 2?"
    assert writers == {str(e["pid"]) for e in inits}, (writers, inits)  # both replicas wrote rows


def test_engine_resource_no_node_has_stops_the_job_at_once(ray_cluster, tiny_model_dir, tmp_path):
    """engine.resources naming a resource no node of the cluster has: the job stops before any
    replica starts (Ray would wait for it forever) with a message naming engine.resources."""
    from rayapp.runtime import ResourceError
    from rayapp.teachers.batch import run

    _write_input(tmp_path / "in.jsonl")
    cfg = load_job(_job(tmp_path, "nores"), ["engine.resources={inference_only: 1}"])
    with pytest.raises(ResourceError) as e:
        run(cfg)
    assert "engine.resources.inference_only: no node has any inference_only" in str(e.value), str(e.value)
    assert not (tmp_path / "nores" / "parts").exists() or not any((tmp_path / "nores" / "parts").iterdir())
