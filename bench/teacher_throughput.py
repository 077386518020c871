"""Teacher throughput: the vLLM actor pool against transformers ``generate`` on the same prompts.

Workload: few-shot chain-of-thought rationale prompts (reasoning + CommonsenseQA questions
from data/, rendered with SmolLM2's chat template), sampled at temperature 0.7 / top-p 0.95
up to ``--max-tokens``, stopping at end-of-sequence, so completion lengths are uneven as
real rationales are. Same model (packaged SmolLM2-135M-Instruct), float32, same prompts.

(a) transformers: ``model.generate`` on left-padded batches of ``--hf-batch`` prompts in
    input order (static batching: a batch runs until its longest member stops).
(b) vLLM: :class:`rayapp.teachers.pool.VLLMEnginePool` with ``--engines`` CPU engines,
    all prompts in one call (continuous batching). Engine start-up is reported, not timed.
(c) the ``kind: batch`` rationale job over ``--batch-rows`` rows: rows/s end to end
    (engine start included) and after the first committed part.
(d) against Ray's own batch LLM path: ``kind: batch, task: generate`` and a ``ray.data.llm``
    vLLM processor (chat-template, tokenize, engine and detokenize stages) on the same
    ``--vs-rows`` questions, each through the chat template, with the same engine settings (one
    CPU engine, float32, eager, max_model_len 1024, max_num_seqs 64, the same KV cache and
    thread binding, batches of 32) and sampling (T=0.7, top-p 0.95, ``--max-tokens``): rows/s end
    to end, engine start included, outputs on disk. Reported as ``vs_ray_data_llm`` (target 1.0x).

Prints a table and writes bench/results/teacher_throughput.json with {"ratio", "target"}.

    .venv/bin/python bench/teacher_throughput.py [--prompts 200] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayapp.data.readers import read_jsonl  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"


def load_questions(n: int) -> list[tuple[str, str]]:
    """(task_type, question) pairs, alternating reasoning and CommonsenseQA."""
    fams = {
        "number": [r["input_text"] for r in read_jsonl(ROOT / "data/reasoning/train.jsonl")],
        "choice": [r["input_text"] for r in read_jsonl(ROOT / "data/csqa/train.jsonl")],
    }
    out = []
    for i in range(n):
        task = "number" if i % 2 == 0 else "choice"
        out.append((task, fams[task][(i // 2) % len(fams[task])]))
    return out


def bench_transformers(prompts: list[str], max_tokens: int, batch: int, seed: int) -> dict:
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(MODEL)
    tok.padding_side = "left"
    model = load_causal_lm(MODEL, "float32").eval()
    eos = model.generation_config.eos_token_id
    torch.manual_seed(seed)
    tokens, lengths = 0, []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=max_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
        for seq in out[:, enc["input_ids"].shape[1] :].tolist():
            n = seq.index(eos) + 1 if eos in seq else len(seq)  # tokens up to and including EOS
            lengths.append(n)
            tokens += n
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "lengths": lengths}


def bench_vllm(prompts: list[str], max_tokens: int, engines: int, seed: int, bind: str = "auto") -> dict:
    from rayapp.config.base import EngineConfig, SamplingConfig
    from rayapp.teachers.pool import VLLMEnginePool

    engine = EngineConfig(num_engines=engines, max_model_len=2048, max_num_seqs=256, kv_cache_gib=2, cpus_per_engine=1,
                          cpu_threads_bind=bind)
    t0 = time.perf_counter()
    pool = VLLMEnginePool(MODEL, engine)
    start = time.perf_counter() - t0
    try:
        sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=seed)
        pool.generate(prompts[:2], sampling.model_copy(update={"max_tokens": 4}))  # warm-up
        started = time.perf_counter()
        out = pool.generate(prompts, sampling)
        seconds = time.perf_counter() - started
        # update_weights timing for the RL loop: the same weights, from a state dict
        from rayapp.models.io import load_causal_lm

        state = load_causal_lm(MODEL).state_dict()
        reload_s = pool.update_weights(state)
    finally:
        pool.shutdown()
    lengths = [len(c.token_ids) for c in out]
    stopped = sum(c.finish_reason == "stop" for c in out)
    return {"seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds, "lengths": lengths,
            "engine_start_s": start, "stopped_at_eos": stopped, "update_weights_s": reload_s}


def bench_batch_job(rows: int) -> dict:
    from rayapp.config import load_job
    from rayapp.teachers.batch import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_job(ROOT / "jobs/rationales_smollm2.yaml", [
            f"input={ROOT / 'data/reasoning/train.jsonl'}", f"max_rows={rows}", f"output_dir={tmp}/out",
            "concurrency=[1,1]", "rows_per_shard=32", "batch_size=32",
            "rationales.gold_filter=flag",  # keep rows the 135M teacher gets wrong (most): this measures generation
        ])
        started = time.perf_counter()
        summary = run(cfg)
        seconds = time.perf_counter() - started
        import pyarrow.parquet as pq

        commits = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
                         for p in Path(tmp, "out", "checkpoint").glob("*.parquet") if not p.name.endswith(".pending.parquet"))
    # Parts committed within a second of each other (two batches done together) give no steady rate.
    span = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0.0
    steady = sum(n for _, n in commits[1:]) / span if span > 1.0 else None
    return {"rows": summary["rows_in"], "written": summary["written"], "gold_agree": summary.get("gold_agree"), "seconds": seconds,
            "rows_per_s_end_to_end": summary["rows_in"] / seconds, "rows_per_s_after_first_part": steady}


VS_ENGINE = {"max_model_len": 1024, "max_num_seqs": 64, "kv_cache_gib": 1, "cpus_per_engine": 1, "cpu_threads_bind": "all"}
VS_BATCH = 32


def vs_rows(n: int, out: Path) -> Path:
    """The first n reasoning and CommonsenseQA questions, alternating, as a batch input file."""
    rows = [{"id": f"q{i}", "input_text": q} for i, (_, q) in enumerate(load_questions(n))]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def bench_rayapp_generate(input_path: Path, max_tokens: int, out_dir: Path) -> dict:
    from rayapp.config import load_job

    cfg = load_job(ROOT / "jobs/batch_infer.yaml", [
        f"input={input_path}", f"output_dir={out_dir}", "concurrency=[1,1]", f"batch_size={VS_BATCH}",
        "rows_per_shard=64", "chat=always", f"engine={json.dumps(VS_ENGINE)}",
        f"sampling={json.dumps({'temperature': 0.7, 'top_p': 0.95, 'max_tokens': max_tokens})}",
    ])
    from rayapp.teachers.batch import run

    started = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - started
    out = read_jsonl(out_dir / "output.jsonl")
    return {"rows": summary["rows_in"], "written": len(out), "seconds": seconds, "rows_per_s": summary["rows_in"] / seconds}


def bench_ray_data_llm(input_path: Path, max_tokens: int, out_dir: Path) -> dict:
    """Ray's ray.data.llm processor with the engine settings of bench_rayapp_generate."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from rayapp.config.base import EngineConfig
    from rayapp.models.io import resolve_model
    from rayapp.teachers.pool import engine_env

    engine = EngineConfig(**VS_ENGINE)
    env = engine_env(engine)
    # engine_env resolves `all` in the engine's own process; here every process is on this machine.
    env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    config = vLLMEngineProcessorConfig(
        model_source=str(resolve_model(MODEL)),
        engine_kwargs={"dtype": engine.dtype, "enforce_eager": engine.enforce_eager, "max_model_len": engine.max_model_len,
                       "max_num_seqs": engine.max_num_seqs, "seed": engine.seed, "gpu_memory_utilization": 0.3},
        batch_size=VS_BATCH, concurrency=1,
        placement_group_config={"bundles": [{"CPU": engine.cpus_per_engine}]},
        runtime_env={"env_vars": env},
        chat_template_stage=True, tokenize_stage=True, detokenize_stage=True,
    )
    processor = build_processor(
        config,
        preprocess=lambda r: {"id": r["id"], "messages": [{"role": "user", "content": r["input_text"]}],
                              "sampling_params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": max_tokens}},
        postprocess=lambda r: {"id": r["id"], "output_text": r["generated_text"], "num_generated_tokens": r["num_generated_tokens"]},
    )
    started = time.perf_counter()
    processor(ray.data.read_json(str(input_path))).write_json(str(out_dir))
    seconds = time.perf_counter() - started
    written = sum(len(read_jsonl(p)) for p in out_dir.glob("*.json"))
    n = len(read_jsonl(input_path))
    return {"rows": n, "written": written, "seconds": seconds, "rows_per_s": n / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--batch-rows", type=int, default=96)
    ap.add_argument("--vs-rows", type=int, default=160, help="rows for rayapp's batch path vs ray.data.llm (0 skips it)")
    ap.add_argument("--only-vs-ray-data-llm", action="store_true", help="run part (d) alone and update its entry in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-threads-bind", nargs="+", default=["auto", "all"],
                    help="engine.cpu_threads_bind values to run the vLLM pool with, one after another")
    ap.add_argument("--out", default=str(ROOT / "bench/results/teacher_throughput.json"))
    args = ap.parse_args(argv)

    from rayapp.models.io import load_tokenizer
    from rayapp.runtime import ensure_ray
    from rayapp.teachers.templates import get_template

    if args.only_vs_ray_data_llm:
        ensure_ray()
        vs = bench_vs_ray_data_llm(args.vs_rows, args.max_tokens)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
        result["vs_ray_data_llm"] = vs
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    tok = load_tokenizer(MODEL)
    prompts = [tok.apply_chat_template(get_template(task).messages(q), add_generation_prompt=True, tokenize=False)
               for task, q in load_questions(args.prompts)]
    ensure_ray()
    pools = {}
    for bind in args.cpu_threads_bind:
        pools[bind] = bench_vllm(prompts, args.max_tokens, args.engines, args.seed, bind)
        p = pools[bind]
        print(f"vLLM pool (cpu_threads_bind={bind}): {p['tokens']} tokens in {p['seconds']:.1f}s = {p['tokens_per_s']:.1f} tok/s", flush=True)
    best = max(pools, key=lambda b: pools[b]["tokens_per_s"])
    vllm = pools[best]
    hf = bench_transformers(prompts, args.max_tokens, args.hf_batch, args.seed)
    print(f"transformers: {hf['tokens']} tokens in {hf['seconds']:.1f}s = {hf['tokens_per_s']:.1f} tok/s", flush=True)
    job = bench_batch_job(args.batch_rows) if args.batch_rows else None
    vs = bench_vs_ray_data_llm(args.vs_rows, args.max_tokens) if args.vs_rows else None
    ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]

    def spread(lengths):
        s = sorted(lengths)
        return f"mean {sum(s) / len(s):.0f}, min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}"

    print(f"\nSmolLM2-135M-Instruct fp32, {len(prompts)} CoT prompts, sampled T=0.7 top-p 0.95, max {args.max_tokens} new tokens, {os.cpu_count()} cores")
    print(f"{'system':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>8}   completion lengths")
    print(f"{'transformers generate (batch ' + str(args.hf_batch) + ')':<34}{hf['tokens']:>8}{hf['seconds']:>9.1f}{hf['tokens_per_s']:>8.1f}   {spread(hf['lengths'])}")
    for bind, p in pools.items():
        label = f"vLLM pool ({args.engines} engine, bind {bind})"
        print(f"{label:<34}{p['tokens']:>8}{p['seconds']:>9.1f}{p['tokens_per_s']:>8.1f}   {spread(p['lengths'])}")
    print(f"ratio vLLM (bind {best}) / transformers: {ratio:.2f}x (target 2.0x); vLLM engine start {vllm['engine_start_s']:.0f}s (not timed); "
          f"{vllm['stopped_at_eos']}/{len(prompts)} stopped at EOS; update_weights(state dict) {vllm['update_weights_s'] * 1000:.0f} ms")
    if job:
        steady = job["rows_per_s_after_first_part"]
        after = f", {steady:.2f} rows/s after the first committed part" if steady else ""
        print(f"batch job (task: rationales, {job['rows']} rows, 1 replica): {job['rows_per_s_end_to_end']:.2f} rows/s "
              f"end to end (engine start included){after}")
    result = {
        "ratio": round(ratio, 3), "target": 2.0, "model": MODEL, "dtype": "float32", "prompts": len(prompts),
        "max_tokens": args.max_tokens, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "transformers": {k: round(v, 2) for k, v in hf.items() if k != "lengths"} | {"batch": args.hf_batch},
        "vllm": {k: round(v, 3) for k, v in vllm.items() if k != "lengths"} | {"engines": args.engines, "cpu_threads_bind": best},
        "vllm_by_cpu_threads_bind": {b: {k: round(v, 3) for k, v in p.items() if k != "lengths"} for b, p in pools.items()},
        "batch_job": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in job.items()} if job else None,
        "vs_ray_data_llm": vs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def bench_vs_ray_data_llm(rows: int, max_tokens: int) -> dict:
    """Part (d): rayapp's batch path and ray.data.llm, one after the other, with a table."""
    with tempfile.TemporaryDirectory() as tmp:
        path = vs_rows(rows, Path(tmp) / "questions.jsonl")
        ours = bench_rayapp_generate(path, max_tokens, Path(tmp) / "rayapp")
        theirs = bench_ray_data_llm(path, max_tokens, Path(tmp) / "ray_data_llm")
    ratio = ours["rows_per_s"] / theirs["rows_per_s"]
    print(f"\n{rows} questions through the chat template, T=0.7 top-p 0.95, max {max_tokens} new tokens, one CPU engine")
    print(f"{'batch path':<36}{'rows':>6}{'written':>9}{'seconds':>9}{'rows/s':>8}")
    for label, r in (("rayapp kind: batch, task: generate", ours), ("ray.data.llm vLLM processor", theirs)):
        print(f"{label:<36}{r['rows']:>6}{r['written']:>9}{r['seconds']:>9.1f}{r['rows_per_s']:>8.3f}")
    print(f"ratio rayapp / ray.data.llm rows/s end to end: {ratio:.2f}x (target 1.0x)")
    round3 = lambda d: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    return {"ratio": round(ratio, 3), "target": 1.0, "rows": rows, "max_tokens": max_tokens, "engine": VS_ENGINE,
            "batch_size": VS_BATCH, "rayapp": round3(ours), "ray_data_llm": round3(theirs)}


if __name__ == "__main__":
    sys.exit(main())
