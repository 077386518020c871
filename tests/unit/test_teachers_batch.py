"""The batch recipe's bookkeeping without an engine: input rejects, per-row results, shards,
resume manifest. (Generation itself is tested in tests/integration/test_teachers_batch.py.)"""

from __future__ import annotations

import json

import pytest

from rayapp.config.batch import BatchJobConfig
from rayapp.config.loader import ConfigError, load_job_dict
from rayapp.data.readers import read_jsonl
from rayapp.teachers import PROMPT_TOO_LONG, Completion
from rayapp.teachers.batch import (
    BatchInputError,
    BatchResumeError,
    assemble,
    check_manifest,
    done_shards,
    load_input,
    manifest,
    process_rows,
    validate,
    write_shard,
)


class Echo:
    model_path = "echo"

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


def test_load_input_sorts_rows_into_usable_and_rejected(tmp_path):
    _input(tmp_path, [json.dumps({"input_text": "a"}), "[1, 2]", json.dumps({"input_text": ""}), json.dumps({"messages": [{"role": "user", "content": "b"}]})])
    items, rejects = load_input(_cfg(tmp_path))
    assert [it["row"] for it in items] == [0, 3]
    assert [(r["row"], r["reason"], r["where"].endswith(f":{r['row'] + 1}")) for r in rejects] == [(1, "bad_row", True), (2, "empty_prompt", True)]
    with pytest.raises(BatchInputError, match="on_bad_rows: error"):
        validate(_cfg(tmp_path, on_bad_rows="error"))
    assert "4 rows, 2 usable" in validate(_cfg(tmp_path))


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


def test_shards_assemble_in_row_order(tmp_path):
    out = tmp_path / "out"
    write_shard(out, 1, [{"row": 3, "status": "ok", "data": {"i": 3}}, {"row": 2, "status": "reject", "reason": "bad_row", "detail": "d", "where": "f:3"}])
    assert done_shards(out, 2) == {1}
    write_shard(out, 0, [{"row": 1, "status": "ok", "data": {"i": 1}}, {"row": 0, "status": "ok", "data": {"i": 0}}])
    stats = assemble(out, 2)
    assert [r["i"] for r in read_jsonl(out / "output.jsonl")] == [0, 1, 3]
    assert stats["written"] == 3 and stats["bad_row"] == 1 and stats["rows_in"] == 4
    assert not list((out / "shards").glob(".*tmp*"))  # no temporary files left


def test_shard_stats_count_dropped_gold_mismatches_as_checked(tmp_path):
    """gold_filter: drop turns disagreements into rejects; they were still checked against gold."""
    rows = [{"row": 0, "status": "ok", "data": {"label": "1", "gold_match": True}},
            {"row": 1, "status": "reject", "reason": "gold_mismatch", "detail": "teacher said 2", "where": "f:2"},
            {"row": 2, "status": "ok", "data": {"label": "5"}}]  # unlabeled: nothing to check
    stats = write_shard(tmp_path / "out", 0, rows)
    assert (stats["gold_checked"], stats["gold_agree"], stats["gold_mismatch"]) == (2, 1, 1)
    assert "tokens" not in stats  # rationale rows carry no token counts; no fake 0
    assert write_shard(tmp_path / "out", 1, [{"row": 3, "status": "ok", "data": {}, "tokens": 7}])["tokens"] == 7


def test_manifest_refuses_to_mix_runs(tmp_path):
    _input(tmp_path, [json.dumps({"input_text": "a"})])
    cfg = _cfg(tmp_path)
    out = tmp_path / "out"
    check_manifest(out, manifest(cfg, 1))
    check_manifest(out, manifest(cfg, 1))  # same run: fine
    with pytest.raises(BatchResumeError, match="rows_per_shard"):
        check_manifest(out, manifest(cfg.model_copy(update={"rows_per_shard": 3}), 1))
    _input(tmp_path, [json.dumps({"input_text": "changed"})])
    with pytest.raises(BatchResumeError, match="input_sha256"):
        check_manifest(out, manifest(cfg, 1))


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
