"""The batch recipe's bookkeeping without an engine or Ray: input index and blocks, row checks,
per-row results, the generation stage's output rows, assembly from committed parts, the resume
manifest. (The Ray Data pipeline is tested in tests/integration/test_teachers_batch_job.py.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.config.batch import BatchJobConfig
from rayapp.config.loader import ConfigError, load_job_dict
from rayapp.data.readers import read_jsonl, read_rows
from rayapp.storage import open_output
from rayapp.teachers import PROMPT_TOO_LONG, Completion
from rayapp.teachers import batch_io as io
from rayapp.teachers.batch import (
    BatchInputError,
    BatchResumeError,
    GenerationStage,
    check_manifest,
    manifest,
    process_rows,
    scan_input,
    validate,
)


class Echo:
    model_path = "echo"

    def __init__(self, *args):
        pass

    def generate(self, prompts, sampling):
        out = []
        for i, p in enumerate(prompts):
            text = p[-1]["content"] if isinstance(p, list) else p
            if "LONG" in text:
                out.append(Completion("", [], PROMPT_TOO_LONG, prompt_index=i, error="too long"))
                continue
            out += [Completion(f"{text}!{k}", [1, 2], "stop", [{1: -0.1}, {2: -0.2}], prompt_index=i, sample_index=k) for k in range(sampling.n)]
        return out


def _cfg(tmp_path, **kw) -> BatchJobConfig:
    return BatchJobConfig(input=str(tmp_path / "in.jsonl"), output_dir=str(tmp_path / "out"), rows_per_shard=2, **kw)


def _input(tmp_path, lines):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")


def test_scan_input_sorts_rows_into_usable_and_rejected(tmp_path):
    _input(tmp_path, [json.dumps({"input_text": "a"}), "[1, 2]", json.dumps({"input_text": ""}), json.dumps({"messages": [{"role": "user", "content": "b"}]})])
    scan = scan_input(_cfg(tmp_path))
    assert (scan["rows"], scan["usable"], scan["by_reason"]) == (4, 2, {"bad_row": 1, "empty_prompt": 1})
    assert [(r["row"], r["reason"], r["where"].endswith(f":{r['row'] + 1}")) for r in scan["first"]] == [(1, "bad_row", True), (2, "empty_prompt", True)]
    with pytest.raises(BatchInputError, match="on_bad_rows: error"):
        validate(_cfg(tmp_path, on_bad_rows="error"))
    assert "4 rows, 2 usable" in validate(_cfg(tmp_path))


def test_blocks_read_back_every_row_as_read_rows_does(tmp_path):
    """A block is a byte offset + line + row number; blank lines are not rows; a BOM is skipped;
    max_rows cuts the input; the blocks cover every row once, with the same file:line."""
    lines = ["\ufeff" + json.dumps({"input_text": "r0"}), "", json.dumps({"input_text": "r1"}), "   ", "{bad",
             json.dumps({"input_text": ""}), *(json.dumps({"input_text": f"r{i}"}) for i in range(4, 12))]
    _input(tmp_path, lines)
    path = str(tmp_path / "in.jsonl")
    expected = [(r.where, r.data, r.error) for r in read_rows(path)]
    for per_block, max_rows in ((3, None), (1, None), (100, None), (4, 7)):
        index = io.index_input(path, max_rows, per_block)
        assert index["rows"] == (max_rows or len(expected))
        got = [(w, d, e) for s, e_, off, ln in index["blocks"] for _, w, d, e in io.block_rows(path, "jsonl", s, e_, off, ln)]
        assert got == expected[: index["rows"]]
        table = pa.concat_tables([io.read_block(path, "jsonl", "generate", *b) for b in index["blocks"]])
        assert table["row"].to_pylist() == list(range(index["rows"]))
        assert table["reason"].to_pylist()[2:4] == ["bad_row", "empty_prompt"]


def test_blocks_of_parquet_rows(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"input_text": [f"q{i}" for i in range(10)]}), path, row_group_size=3)
    index = io.index_input(str(path), None, 4)
    assert index["format"] == "parquet" and [b[:2] for b in index["blocks"]] == [(0, 4), (4, 8), (8, 10)]
    rows = [r for b in index["blocks"] for r in io.block_rows(str(path), "parquet", *b)]
    assert [(n, d["input_text"], w.endswith(f":{n + 1}")) for n, w, d, _ in rows] == [(i, f"q{i}", True) for i in range(10)]


def test_generation_stage_rows_carry_results_and_rejects(tmp_path):
    cfg = _cfg(tmp_path, sampling={"temperature": 0.0, "max_tokens": 4})
    stage = GenerationStage("unused", cfg.model_dump(), chat=False, generator=Echo)
    out = stage({"row": [4, 5, 6], "where": ["f:5", "f:6", "f:7"], "json": [json.dumps({"input_text": "hi"}), "", json.dumps({"input_text": "LONG"})],
                 "reason": [None, "bad_row", None], "detail": [None, "malformed JSON", None]})
    assert sorted(out) == sorted(io.PART_COLUMNS)
    by_row = {r: (s, reason, json.loads(j)) for r, s, reason, j in zip(out["row"], out["status"], out["reason"], out["json"], strict=True)}
    assert by_row[4][:2] == ("ok", None) and by_row[4][2]["output_text"] == "hi!0"
    assert by_row[5] == ("reject", "bad_row", {"row": 5, "where": "f:6", "reason": "bad_row", "detail": "malformed JSON"})
    assert by_row[6][1] == PROMPT_TOO_LONG and by_row[6][2]["where"] == "f:7"
    assert set(out["gold"]) == {-1} and all(g > 0 for g in out["gen_s"])


def test_process_rows_generate_keeps_input_fields_and_reports_rejects(tmp_path):
    cfg = _cfg(tmp_path, sampling={"n": 2, "temperature": 1.0, "logprobs": 1})
    items = [{"row": 5, "data": {"input_text": "hi", "id": 1}}, {"row": 6, "data": {"input_text": "LONG"}}]
    res = process_rows(Echo(), items, cfg, chat=True)
    assert res[0]["status"] == "ok" and res[0]["data"]["id"] == 1 and res[0]["data"]["output_text"] == "hi!0"
    assert res[0]["data"]["candidates"] == ["hi!0", "hi!1"] and res[0]["data"]["logprobs"] == [{"1": -0.1}, {"2": -0.2}]
    assert res[0]["tokens"] == 4
    assert res[1] == {"row": 6, "status": "reject", "reason": PROMPT_TOO_LONG, "detail": "too long"}


def test_process_rows_rationales_maps_rejects_back_to_input_rows(tmp_path):
    cfg = _cfg(tmp_path, task="rationales", rationales={"task_type": "free"})
    items = [{"row": 7, "data": {"input_text": "x. So the answer is y"}}, {"row": 8, "data": {"input_text": "no marker"}}]
    res = process_rows(Echo(), items, cfg, chat=True)
    assert [(r["row"], r["status"]) for r in res] == [(7, "ok"), (8, "reject")]
    assert res[0]["data"]["label"] == "y!0" and "_row" not in res[0]["data"] and res[1]["reason"] == "unparsable"


def _part(store, name: str, rows: list[tuple], commit: bool = True) -> None:
    """A part as the sink writes it (and its checkpoint, committed or pending, as Ray Data writes it)."""
    cols = {k: [] for k in io.PART_COLUMNS}
    for row, status, reason, gold in rows:
        record = {"i": row} if status == "ok" else {"row": row, "reason": reason}
        for k, v in zip(io.PART_COLUMNS, (row, status, reason, f"f:{row + 1}", 2, gold, 0.5, "n:1", json.dumps(record)), strict=True):
            cols[k].append(v)
    (store.path(io.PARTS)).mkdir(parents=True, exist_ok=True)
    (store.path(io.CHECKPOINT)).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), store.path(f"{io.PARTS}/{name}.parquet"))
    suffix = ".parquet" if commit else ".pending.parquet"
    pq.write_table(pa.table({"row": [r[0] for r in rows]}), store.path(f"{io.CHECKPOINT}/{name}{suffix}"))


def test_assemble_merges_committed_parts_in_row_order(tmp_path):
    store = open_output(tmp_path / "out")
    _part(store, "b", [(1, "ok", None, -1), (4, "reject", "gold_mismatch", 0), (5, "ok", None, 1)])
    _part(store, "a", [(0, "ok", None, -1), (2, "reject", "bad_row", -1), (3, "ok", None, 0)])
    _part(store, "c", [(3, "ok", None, -1)], commit=False)  # a task killed before its commit: not counted
    assert io.done_rows(store) == 6
    stats = io.assemble(store, 6)
    assert [r["i"] for r in read_jsonl(store.path("output.jsonl"))] == [0, 1, 3, 5]
    assert [r["row"] for r in read_jsonl(store.path("rejects.jsonl"))] == [2, 4]
    assert (stats["rows_in"], stats["written"], stats["bad_row"], stats["gold_mismatch"], stats["tokens"], stats["parts"]) == (6, 4, 1, 1, 8, 2)
    assert (stats["gold_checked"], stats["gold_agree"]) == (3, 1)
    assert json.loads(store.path("stats.json").read_text()) == stats
    assert not list(store.local.glob(".*tmp*"))


def test_assemble_refuses_duplicates_and_gaps(tmp_path):
    store = open_output(tmp_path / "dup")
    _part(store, "a", [(0, "ok", None, -1), (1, "ok", None, -1)])
    _part(store, "b", [(1, "ok", None, -1), (2, "ok", None, -1)])
    with pytest.raises(io.BatchIntegrityError, match=r"duplicated rows \[1\]"):
        io.assemble(store, 3)
    assert not store.path("output.jsonl").exists()  # nothing written from a bad set of parts
    gap = open_output(tmp_path / "gap")
    _part(gap, "a", [(0, "ok", None, -1), (3, "ok", None, -1)])
    with pytest.raises(io.BatchIntegrityError, match=r"missing rows \[1, 2, 4\]"):
        io.assemble(gap, 5)


def test_manifest_refuses_to_mix_runs(tmp_path):
    _input(tmp_path, [json.dumps({"input_text": "a"})])
    cfg = _cfg(tmp_path)
    store = open_output(tmp_path / "out")
    index = io.index_input(cfg.input, None, 2)
    check_manifest(store, manifest(cfg, index))
    check_manifest(store, manifest(cfg, index))  # same run: fine
    with pytest.raises(BatchResumeError, match="rows_per_shard"):
        check_manifest(store, manifest(cfg.model_copy(update={"rows_per_shard": 3}), index))
    _input(tmp_path, [json.dumps({"input_text": "changed"})])
    with pytest.raises(BatchResumeError, match="input_sha256"):
        check_manifest(store, manifest(cfg, io.index_input(cfg.input, None, 2)))
    _part(store, "a", [(0, "ok", None, -1)])
    check_manifest(store, manifest(cfg, io.index_input(cfg.input, None, 2)), restart_on_change=True)  # a cache: start over
    assert io.done_rows(store) == 0 and not store.path(io.PARTS).exists()


def test_config_checks_name_the_fields():
    with pytest.raises(ConfigError, match="concurrency"):
        load_job_dict({"kind": "batch", "concurrency": [2, 1]})
    with pytest.raises(ConfigError, match="self_consistency_n"):
        load_job_dict({"kind": "batch", "task": "rationales", "sampling": {"temperature": 0}, "rationales": {"self_consistency_n": 3}})
    with pytest.raises(ConfigError, match="unknown field"):
        load_job_dict({"kind": "batch", "rationale": {}})


@pytest.mark.parametrize("job", ["jobs/rationales_smollm2.yaml", "jobs/batch_infer.yaml"])
def test_example_jobs_validate(job):
    from pathlib import Path

    from rayapp.config import load_job

    root = Path(__file__).resolve().parents[2]
    cfg = load_job(root / job)
    cfg.input = str(root / cfg.input)
    assert "usable" in validate(cfg)


def test_cpu_sampling_drops_request_seed():
    pytest.importorskip("vllm")
    from rayapp.config.base import SamplingConfig
    from rayapp.teachers.pool import sampling_params

    s = SamplingConfig(temperature=0.7, top_p=0.9, seed=3)
    assert sampling_params(s, cpu=True).seed is None  # vLLM CPU dies on seeded top-p sampling
    assert sampling_params(s, cpu=False).seed == 3
    assert sampling_params(s.model_copy(update={"top_p": 1.0}), cpu=True).seed is None  # and on plain sampling


def test_rationales_with_no_shots_sends_the_bare_question():
    """`rationales.shots: []` means zero-shot (a teacher tuned on the task), not the default shots."""
    from rayapp.config import load_job_dict
    from rayapp.teachers import Completion
    from rayapp.teachers.batch import process_rows

    seen = []

    class Recorder:
        model_path = "m"

        def generate(self, prompts, sampling):
            seen.extend(prompts)
            return [Completion(text="1 + 1 = 2. So the answer is 2.", token_ids=[1], finish_reason="stop", prompt_index=i) for i in range(len(prompts))]

    cfg = load_job_dict({"kind": "batch", "task": "rationales", "output_dir": "/tmp/x",
                         "rationales": {"task_type": "number", "system": "", "shots": [], "gold_filter": "off"}})
    rows = process_rows(Recorder(), [{"row": 0, "data": {"input_text": "What is 1 + 1?"}}], cfg, chat=True)
    assert seen == [[{"role": "user", "content": "What is 1 + 1?"}]]
    assert rows[0]["status"] == "ok" and rows[0]["data"]["label"] == "2"


def test_engine_thread_binding_env():
    """cpu_threads_bind reaches vLLM as VLLM_CPU_OMP_THREADS_BIND; 'all' resolves on the engine's node only."""
    import os

    from rayapp.config.base import EngineConfig
    from rayapp.teachers.pool import engine_env

    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(EngineConfig())  # auto: vLLM decides
    assert engine_env(EngineConfig(cpu_threads_bind="0-3"))["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(EngineConfig(cpu_threads_bind="all"))  # the driver's cores may differ
    here = engine_env(EngineConfig(cpu_threads_bind="all"), on_engine_node=True)["VLLM_CPU_OMP_THREADS_BIND"]
    assert sorted(map(int, here.split(","))) == sorted(os.sched_getaffinity(0))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(EngineConfig(cpu_threads_bind="all", use_gpu=True), on_engine_node=True)
    with pytest.raises(ValueError, match="cpu_threads_bind"):
        EngineConfig(cpu_threads_bind="cores 0 to 3")


def test_cpu_engines_run_their_engine_core_in_process(monkeypatch):
    """On CPU the vLLM engine core runs in the engine's own process (no second process to start and
    share the cores with); on GPU vLLM's default (a separate process) stays; the environment's own
    setting wins."""
    from rayapp.config.base import EngineConfig
    from rayapp.teachers.pool import engine_env

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert engine_env(EngineConfig())["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(EngineConfig(use_gpu=True))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert engine_env(EngineConfig())["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
