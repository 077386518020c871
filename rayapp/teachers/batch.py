"""`kind: batch` — generation over a dataset on Ray Data with an autoscaling pool of vLLM replicas,
each writing its own results straight to ``output_dir``.

The pipeline (``batch_io`` holds the reading and writing side):

    BatchInput (read tasks, one per block of ``rows_per_shard`` input rows, each keyed by row number)
      -> CheckpointFilter (Ray Data's: rows a earlier run already committed never reach a replica)
      -> GenerationStage (one vLLM engine per actor, ``concurrency: [min, max]`` actors)
      -> PartsSink (parquet parts in output_dir/parts, written by the worker holding the rows,
         each committed in output_dir/checkpoint by Ray Data's two-phase checkpoint)
    then assemble (a Ray task): output.jsonl, rejects.jsonl, stats.json from the committed parts.

No generated row passes through the driver: it holds the block list, and a count. A killed run
leaves committed parts and at most some uncommitted ones (deleted by Ray Data on the next run);
a re-run generates only the rows not committed, and assembly refuses to write unless every input
row is there exactly once, in output.jsonl or in rejects.jsonl (with its reason). A replica that
dies is restarted by Ray Data and its unfinished batches are run again (nothing of them was
committed).

Not ``ray.data.llm``: its stages want ``messages`` rows and return raw text; here a stage also
parses rationales, applies the gold filter and turns empty / over-long prompts into counted
rejects, all inside the replica that holds the engine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from rayapp.config.batch import BatchJobConfig
from rayapp.errors import UserError
from rayapp.teachers import Completion
from rayapp.teachers import batch_io as io

log = logging.getLogger(__name__)
LAYOUT = "parts-v2"  # output_dir layout; a directory of the earlier shards layout is another run


class BatchInputError(UserError, ValueError):
    pass


class BatchResumeError(UserError, RuntimeError):
    pass


# -- input checks on the driver (streaming: nothing kept but counts and the first problems) ----

def scan_input(cfg: BatchJobConfig, keep: int = 10) -> dict:
    """{"rows", "usable", "by_reason", "first": first ``keep`` rejects} over every input row."""
    from rayapp.data.readers import read_rows

    out = {"rows": 0, "usable": 0, "by_reason": {}, "first": []}
    for n, row in enumerate(read_rows(cfg.input, cfg.max_rows)):
        out["rows"] += 1
        reason, detail = ("bad_row", row.error) if row.error else io.check_row(row.data, cfg.task)[1:]
        if reason is None:
            out["usable"] += 1
            continue
        out["by_reason"][reason] = out["by_reason"].get(reason, 0) + 1
        if len(out["first"]) < keep:
            out["first"].append({"row": n, "where": row.where, "reason": reason, "detail": detail})
    return out


def _check_input(cfg: BatchJobConfig, scan: dict) -> None:
    if not scan["rows"]:
        raise BatchInputError(f"{cfg.input}: no rows; input: expected a non-empty .jsonl, .parquet or datasets directory")
    bad = scan["rows"] - scan["usable"]
    if bad and cfg.on_bad_rows == "error":
        shown = "\n".join(f"  {r['where']}: {r['detail']}" for r in scan["first"])
        raise BatchInputError(f"{bad} bad input row(s) in {cfg.input} (on_bad_rows: error; set on_bad_rows: drop to skip and count them):\n{shown}")


def manifest(cfg: BatchJobConfig, index: dict) -> dict:
    """What the written rows depend on (the cache key of teacher output): a re-run with any of it
    changed must not mix with them. ``model_weights`` tells a teacher retrained into the same directory apart."""
    from rayapp.models.io import model_stamp, resolve_model

    return {
        "layout": LAYOUT, "input": str(Path(cfg.input).resolve()), "input_sha256": index["sha256"], "num_rows": index["rows"],
        "max_rows": cfg.max_rows, "rows_per_shard": cfg.rows_per_shard, "task": cfg.task, "model": cfg.model.path,
        "model_weights": model_stamp(resolve_model(cfg.model.path)), "chat": cfg.chat,
        "sampling": cfg.sampling.model_dump(), "rationales": cfg.rationales.model_dump() if cfg.task == "rationales" else None,
        "max_model_len": cfg.engine.max_model_len,
    }


def check_manifest(store, new: dict, restart_on_change: bool = False) -> None:
    """Keep the rows of the run ``new`` describes; those of another run raise BatchResumeError, or
    with ``restart_on_change`` are removed (a cache whose key changed)."""
    if store.exists("manifest.json"):
        old = store.read_json("manifest.json")
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and restart_on_change:
            log.info("%s: %s changed; generating again", store.uri, ", ".join(changed))
            clear(store)
        elif changed:
            raise BatchResumeError(
                f"{store.uri}: holds rows of a different run ({', '.join(changed)} changed since "
                f"{store.uri_of('manifest.json')} was written); use a new output_dir, or delete {store.uri} to start over"
            )
    if not store.exists("manifest.json"):
        store.write_json("manifest.json", new)


def clear(store) -> None:
    """Remove what a run wrote (parts, checkpoint, outputs, manifest, and the earlier shards layout)."""
    import pyarrow.fs as pafs

    for rel in (io.PARTS, io.CHECKPOINT, "shards"):
        if store.fs.get_file_info(io.fs_path(store, rel)).type == pafs.FileType.Directory:
            store.fs.delete_dir(io.fs_path(store, rel))
    for rel in ("output.jsonl", "rejects.jsonl", "stats.json", "summary.json", "manifest.json"):
        if store.exists(rel):
            store.fs.delete_file(io.fs_path(store, rel))


# -- the work inside a replica -----------------------------------------------------------------

class EngineGenerator:
    """A :class:`LocalEngine` seen through the Generator protocol (for generate_rationales)."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_path = model_name

    def generate(self, prompts, sampling):
        return [Completion(**d) for d in self.engine.generate(prompts, sampling.model_dump())]


def process_rows(gen, items: list[dict], cfg: BatchJobConfig, chat: bool) -> list[dict]:
    """Generate for ``items`` ({"row", "data"}); one result per item: {"row", "status": ok|reject, ...}."""
    if cfg.task == "rationales":
        from rayapp.teachers.rationales import generate_rationales
        from rayapp.teachers.templates import get_template

        r = cfg.rationales
        template = get_template(r.task_type, r.system, [s.model_dump() for s in r.shots] if r.shots is not None else None)
        inputs = [{**it["data"], "_row": it["row"]} for it in items]
        rows, stats = generate_rationales(gen, inputs, template, cfg.sampling, r.self_consistency_n, r.gold_filter, chat, cfg.model.path)
        results = [{"row": row.pop("_row"), "status": "ok", "data": row} for row in rows]
        for rej in stats["rejects"]:
            results.append({"row": items[rej["index"]]["row"], "status": "reject", "reason": rej["reason"], "detail": rej["detail"]})
        return results

    prompts = [
        it["data"]["messages"] if "messages" in it["data"]
        else [{"role": "user", "content": it["data"]["input_text"]}] if chat else it["data"]["input_text"]
        for it in items
    ]
    completions = gen.generate(prompts, cfg.sampling)
    by_prompt: dict[int, list[Completion]] = {}
    for c in completions:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    teacher = {"model": getattr(gen, "name", cfg.model.path), "template": "chat" if chat else "plain", "sampling": cfg.sampling.model_dump()}
    results = []
    for i, it in enumerate(items):
        cands = by_prompt.get(i, [])
        if not cands or cands[0].error:
            reason = cands[0].finish_reason if cands else "empty_prompt"
            results.append({"row": it["row"], "status": "reject", "reason": reason, "detail": cands[0].error if cands else "no completion"})
            continue
        first = cands[0]
        row = {**it["data"], "output_text": first.text, "finish_reason": first.finish_reason, "teacher": teacher}
        if cfg.sampling.n > 1:
            row["candidates"] = [c.text for c in cands]
        if cfg.sampling.logprobs is not None:
            row["token_ids"] = first.token_ids
            row["logprobs"] = [{str(t): lp for t, lp in d.items()} for d in first.logprobs or []]
        results.append({"row": it["row"], "status": "ok", "data": row, "tokens": sum(len(c.token_ids) for c in cands)})
    return results


class GenerationStage:
    """Ray Data callable class: one generator per actor (a vLLM engine, or what ``generator(model_dir,
    cfg)`` builds: benchmarks replace the engine with a trivial stage), input rows in, one result
    row out per input row (rows rejected at read time pass through untouched)."""

    def __init__(self, model_dir: str, job: dict, chat: bool, generator=None):
        self.cfg = BatchJobConfig.model_validate(job)
        if generator is None:
            from rayapp.teachers.pool import LocalEngine

            self.gen = EngineGenerator(LocalEngine(model_dir, self.cfg.engine), self.cfg.model.path)
        else:
            self.gen = generator(model_dir, self.cfg)
        self.chat = chat
        import ray

        node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else ""  # "" outside Ray (unit tests)
        self.replica = f"{node}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        rows = [int(r) for r in batch["row"]]
        where = dict(zip(rows, batch["where"], strict=True))
        results = [{"row": r, "status": "reject", "reason": reason, "detail": detail}
                   for r, reason, detail in zip(rows, batch["reason"], batch["detail"], strict=True) if reason]
        items = [{"row": r, "data": json.loads(d)} for r, d, reason in zip(rows, batch["json"], batch["reason"], strict=True) if not reason]
        if items:
            results += process_rows(self.gen, items, self.cfg, self.chat)
        per_row = (time.perf_counter() - started) / max(1, len(rows))
        out: dict[str, list] = {k: [] for k in io.PART_COLUMNS}
        for r in results:
            ok = r["status"] == "ok"
            gold = _gold(r["data"].get("gold_match") if ok else (False if r["reason"] == "gold_mismatch" else None))
            record = r["data"] if ok else {"row": r["row"], "where": where[r["row"]], "reason": r["reason"], "detail": r.get("detail")}
            for key, value in (("row", r["row"]), ("status", r["status"]), ("reason", None if ok else r["reason"]),
                               ("where", where[r["row"]]), ("tokens", r.get("tokens", 0)), ("gold", gold), ("gen_s", per_row),
                               ("replica", self.replica), ("json", json.dumps(record, ensure_ascii=False))):
                out[key].append(value)
        return out


def _gold(match: bool | None) -> int:
    """The ``gold`` column: 1 agrees with the gold label, 0 disagrees (kept flagged, or rejected as
    gold_mismatch), -1 not checked."""
    return -1 if match is None else int(bool(match))


# -- the recipe -------------------------------------------------------------------------------

def validate(cfg: BatchJobConfig) -> str:
    scan = scan_input(cfg)
    _check_input(cfg, scan)
    lines = [f"input {cfg.input}: {scan['rows']} rows, {scan['usable']} usable" + (f", rejected {scan['by_reason']}" if scan["by_reason"] else "")]
    done = 0
    if "://" in cfg.output_dir or Path(cfg.output_dir).exists():
        from rayapp.storage import open_output

        done = io.done_rows(open_output(cfg.output_dir))
    lines.append(f"{done} row(s) already written in {cfg.output_dir}")
    return "\n".join(lines)


def _write_config(cfg: BatchJobConfig, store) -> None:
    from rayapp.config.loader import dump_config

    store.write_text("config.resolved.yaml", dump_config(cfg))


def batches_in_flight(cfg: BatchJobConfig) -> int:
    """Batches one engine works on at once: enough to fill its max_num_seqs, and one more."""
    sequences = cfg.batch_size * max(1, cfg.sampling.n) * (cfg.rationales.self_consistency_n if cfg.task == "rationales" else 1)
    return max(2, -(-cfg.engine.max_num_seqs // sequences) + 1)


def _generate(cfg: BatchJobConfig, store, index: dict, generator) -> int:
    """Run the pipeline over the rows not yet committed; returns the rows it wrote."""
    from rayapp.models.io import resolve_model, wants_chat
    from rayapp.runtime import check_resources, ensure_ray
    from rayapp.teachers.pool import check_engine_resources, engine_env

    ray = ensure_ray()
    model_dir = str(resolve_model(cfg.model.path))
    chat = wants_chat(cfg.chat, model_dir)
    lo, hi = cfg.concurrency
    eng = cfg.engine
    gpus = eng.tensor_parallel_size if eng.use_gpu else 0
    check_resources(cpus=lo * eng.cpus_per_engine, gpus=lo * gpus, what=f"{cfg.name} (concurrency min {lo} replicas)")
    check_engine_resources(ray, eng.model_copy(update={"num_engines": lo}), cfg.name)
    ctx = ray.data.DataContext.get_current()
    before = ctx.checkpoint_config
    ctx.checkpoint_config = io.checkpoint_config(store)
    # rayapp prints its own progress (parts committed); Ray Data's would add a dozen lines every 10 s.
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    try:
        ds = ray.data.read_datasource(io.input_datasource(str(cfg.input), index, cfg.task))
        remote_args: dict = {"num_cpus": eng.cpus_per_engine}
        if gpus:
            remote_args["num_gpus"] = gpus
        if eng.resources:
            remote_args["resources"] = dict(eng.resources)
        pool: dict = {"min_size": lo, "max_size": hi}
        if generator is None:
            remote_args["runtime_env"] = {"env_vars": engine_env(eng)}
            # Several batches in one engine at once (LocalEngine.generate is thread-safe and batches
            # concurrent calls together): the engine stays full while a batch's longest completions
            # finish, and a next batch is ready when one ends.
            pool |= {"max_concurrent_calls_per_actor": batches_in_flight(cfg), "enable_true_multi_threading": True}
        ds = ds.map_batches(
            GenerationStage,
            fn_constructor_kwargs={"model_dir": model_dir, "job": cfg.model_dump(), "chat": chat, "generator": generator},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(**pool),
            **remote_args,
        )
        sink = io.parts_sink(store)
        ds.write_datasink(sink)
        return sink.rows_written
    finally:
        ctx.checkpoint_config = before


def run(cfg: BatchJobConfig, restart_on_change: bool = False, generator=None) -> dict:
    """The job; ``restart_on_change``: rows of a run with another manifest are removed instead of
    refused (distillation's teacher rationales: a cache). ``generator``: ``(model_dir, cfg) ->`` an
    object with ``generate(prompts, sampling) -> list[Completion]`` (and a ``name`` recorded as the
    teacher model) used in each replica instead of a vLLM engine (benchmarks of the pipeline)."""
    from rayapp.storage import open_output

    started = time.perf_counter()
    store = open_output(cfg.output_dir)
    index = io.index_input(str(cfg.input), cfg.max_rows, cfg.rows_per_shard)
    n = index["rows"]
    if not n or cfg.on_bad_rows == "error":  # same checks and messages as `rayapp validate`
        _check_input(cfg, scan_input(cfg) if n else {"rows": 0})
    check_manifest(store, manifest(cfg, index), restart_on_change)
    _write_config(cfg, store)
    skipped = io.done_rows(store)
    log.info("%s: %d rows in %d blocks; %d already written, %d to generate", cfg.name, n, len(index["blocks"]), skipped, n - skipped)
    generated = _generate(cfg, store, index, generator) if skipped < n else 0
    total = _assemble(store, n)
    seconds = time.perf_counter() - started
    summary = {
        "output": store.uri_of("output.jsonl"), "rows_in": n, "written": total["written"], "rejected": n - total["written"],
        "rows_skipped": skipped, "rows_generated": generated, "parts": total["parts"],
        "seconds": round(seconds, 1), "rows_per_s": round(generated / seconds, 2) if generated else 0.0,
    }
    summary.update({k: v for k, v in total.items() if k not in summary and k not in ("rows_in", "tokens")})
    store.write_json("summary.json", summary)
    return summary


def _assemble(store, n: int) -> dict:
    """Assembly as a Ray task beside the data when Ray is running (the driver stays small), else here."""
    import ray

    if not ray.is_initialized():
        return io.assemble(store, n)
    return ray.get(ray.remote(num_cpus=0)(io.assemble).remote(store, n))
