"""`kind: batch` — generation over a dataset on Ray Data with an autoscaling pool of vLLM replicas.

Read the input rows, split them by row number into shards of ``rows_per_shard``, skip shards
already in ``output_dir/shards``, run the rest through ``map_batches`` with
:class:`GenerationStage` (one vLLM engine per actor, ``concurrency: [min, max]`` actors),
and, as results stream back to the driver, write each shard the moment all its rows are in
(through a temporary file renamed into place). A killed run therefore leaves only whole
shards behind, and a re-run produces every row exactly once. When every shard is written,
``output.jsonl``, ``rejects.jsonl`` and ``stats.json`` are assembled from the shards.

Not ``ray.data.llm``: its stages want ``messages`` rows and return raw text; here a stage also
parses rationales, applies the gold filter and turns empty / over-long prompts into counted
rejects, all inside the replica that holds the engine.

Every input row ends up in exactly one of output.jsonl or rejects.jsonl (with its reason).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from rayapp.config.batch import BatchJobConfig
from rayapp.config.loader import write_resolved_config
from rayapp.data.readers import read_jsonl, read_rows, write_jsonl_atomic
from rayapp.errors import UserError
from rayapp.fileio import write_text_atomic
from rayapp.teachers import Completion

log = logging.getLogger(__name__)


class BatchInputError(UserError, ValueError):
    pass


class BatchResumeError(UserError, RuntimeError):
    pass


# -- input ------------------------------------------------------------------------------------

def load_input(cfg: BatchJobConfig) -> tuple[list[dict], list[dict]]:
    """(items, rejects): items are {"row", "where", "data"} for usable rows; rejects name the
    file:line, field and reason of each row that cannot be used."""
    from rayapp.data.formats import RowError, parse_distill_input, parse_prompt, present

    parse = parse_distill_input if cfg.task == "rationales" else parse_prompt
    items, rejects = [], []
    for n, row in enumerate(read_rows(cfg.input, cfg.max_rows)):
        if row.error:
            rejects.append({"row": n, "where": row.where, "reason": "bad_row", "detail": row.error})
            continue
        data = present(row.data)
        try:
            parse(data)
        except RowError as e:
            reason = "empty_prompt" if e.kind == "empty text" and e.field in ("input_text", "messages") else "bad_row"
            rejects.append({"row": n, "where": row.where, "reason": reason, "detail": f"{e.field}: {e.reason}"})
            continue
        items.append({"row": n, "where": row.where, "data": data})
    return items, rejects


def _fingerprint_input(path: str) -> str:
    p, h = Path(path), hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def manifest(cfg: BatchJobConfig, num_rows: int) -> dict:
    """What the shards depend on (the cache key of teacher output): a re-run with any of it changed
    must not mix shards. ``model_weights`` tells a teacher retrained into the same directory apart."""
    from rayapp.models.io import model_stamp, resolve_model

    return {
        "input": str(Path(cfg.input).resolve()), "input_sha256": _fingerprint_input(cfg.input), "num_rows": num_rows,
        "max_rows": cfg.max_rows, "rows_per_shard": cfg.rows_per_shard, "task": cfg.task, "model": cfg.model.path,
        "model_weights": model_stamp(resolve_model(cfg.model.path)), "chat": cfg.chat,
        "sampling": cfg.sampling.model_dump(), "rationales": cfg.rationales.model_dump() if cfg.task == "rationales" else None,
        "max_model_len": cfg.engine.max_model_len,
    }


def check_manifest(out: Path, new: dict, restart_on_change: bool = False) -> None:
    """Keep the shards of the run ``new`` describes; those of another run raise BatchResumeError,
    or with ``restart_on_change`` are removed (a cache whose key changed)."""
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and restart_on_change:
            log.info("%s: %s changed; generating again", out, ", ".join(changed))
            shutil.rmtree(out / "shards", ignore_errors=True)
            path.unlink()
        elif changed:
            raise BatchResumeError(
                f"{out}: holds shards of a different run ({', '.join(changed)} changed since {path} was written); "
                f"use a new output_dir, or delete {out} to start over"
            )
    if not path.exists():
        write_text_atomic(path, json.dumps(new, indent=1))


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
    teacher = {"model": cfg.model.path, "template": "chat" if chat else "plain", "sampling": cfg.sampling.model_dump()}
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
    """Ray Data callable class: one vLLM engine per actor, rows in as JSON, results out as JSON."""

    def __init__(self, model_dir: str, job: dict, chat: bool):
        from rayapp.teachers.pool import LocalEngine

        self.cfg = BatchJobConfig.model_validate(job)
        self.gen = EngineGenerator(LocalEngine(model_dir, self.cfg.engine), self.cfg.model.path)
        self.chat = chat

    def __call__(self, batch: dict) -> dict:
        items = [{"row": int(r), "data": json.loads(d)} for r, d in zip(batch["row"], batch["json"], strict=True)]
        results = process_rows(self.gen, items, self.cfg, self.chat)
        return {"row": [r["row"] for r in results], "json": [json.dumps(r, ensure_ascii=False) for r in results]}


# -- shards -----------------------------------------------------------------------------------

def shard_path(out: Path, k: int, what: str = "rows") -> Path:
    suffix = {"rows": ".jsonl", "rejects": ".rejects.jsonl", "stats": ".stats.json"}[what]
    return out / "shards" / f"shard-{k:05d}{suffix}"


def done_shards(out: Path, num_shards: int) -> set[int]:
    """Shards whose rows file exists: it is renamed into place last, after rejects and stats."""
    return {k for k in range(num_shards) if shard_path(out, k).exists()}


def write_shard(out: Path, k: int, results: list[dict], generate_s: float = 0.0) -> dict:
    """Write shard ``k``; ``generate_s``: the wall time it took since the previous shard (or the start),
    summed in stats.json so that teacher output keeps the time it cost."""
    results = sorted(results, key=lambda r: r["row"])
    ok = [r for r in results if r["status"] == "ok"]
    rejects = [{key: r.get(key) for key in ("row", "where", "reason", "detail")} for r in results if r["status"] != "ok"]
    stats: dict[str, Any] = {"rows_in": len(results), "written": len(ok), "generate_s": round(generate_s, 1)}
    if any("tokens" in r for r in ok):  # generated tokens (task: generate; rationale rows do not count them)
        stats["tokens"] = sum(r.get("tokens", 0) for r in ok)
    for rej in rejects:
        stats[rej["reason"]] = stats.get(rej["reason"], 0) + 1
    gold = [r["data"]["gold_match"] for r in ok if r["data"].get("gold_match") is not None]
    # Checked against a gold label: rows kept (gold_match true, or false under gold_filter: flag) and
    # rows dropped as gold_mismatch (gold_filter: drop).
    stats["gold_checked"], stats["gold_agree"] = len(gold) + stats.get("gold_mismatch", 0), sum(gold)
    write_jsonl_atomic(shard_path(out, k, "rejects"), rejects)
    write_jsonl_atomic(shard_path(out, k, "stats"), [stats])
    write_jsonl_atomic(shard_path(out, k), [r["data"] for r in ok])  # last: marks the shard done
    return stats


def assemble(out: Path, num_shards: int) -> dict:
    """output.jsonl, rejects.jsonl and stats.json from every shard."""
    total: dict[str, Any] = {}
    for k in range(num_shards):
        for key, value in read_jsonl(shard_path(out, k, "stats"))[0].items():
            total[key] = total.get(key, 0) + value
    write_jsonl_atomic(out / "output.jsonl", (row for k in range(num_shards) for row in read_jsonl(shard_path(out, k))))
    write_jsonl_atomic(out / "rejects.jsonl", (row for k in range(num_shards) for row in read_jsonl(shard_path(out, k, "rejects"))))
    total["shards"] = num_shards
    total["generate_s"] = round(total.get("generate_s", 0.0), 1)
    (out / "stats.json").write_text(json.dumps(total, indent=1))
    return total


# -- the recipe -------------------------------------------------------------------------------

def _check_input(cfg: BatchJobConfig, items: list[dict], rejects: list[dict]) -> int:
    n = len(items) + len(rejects)
    if not n:
        raise BatchInputError(f"{cfg.input}: no rows; input: expected a non-empty .jsonl, .parquet or datasets directory")
    if rejects and cfg.on_bad_rows == "error":
        shown = "\n".join(f"  {r['where']}: {r['detail']}" for r in rejects[:10])
        raise BatchInputError(f"{len(rejects)} bad input row(s) in {cfg.input} (on_bad_rows: error; set on_bad_rows: drop to skip and count them):\n{shown}")
    return n


def validate(cfg: BatchJobConfig) -> str:
    items, rejects = load_input(cfg)
    n = _check_input(cfg, items, rejects)
    shards = -(-n // cfg.rows_per_shard)
    done = done_shards(Path(cfg.output_dir), shards)
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    lines = [f"input {cfg.input}: {n} rows, {len(items)} usable" + (f", rejected {by_reason}" if rejects else "")]
    lines.append(f"{shards} shard(s) of {cfg.rows_per_shard} rows; {len(done)} already written in {cfg.output_dir}/shards")
    return "\n".join(lines)


def run(cfg: BatchJobConfig, restart_on_change: bool = False) -> dict:
    """The job; ``restart_on_change``: shards of a run with another manifest are removed instead of
    refused (distillation's teacher rationales: a cache)."""
    from rayapp.models.io import resolve_model, wants_chat
    from rayapp.runtime import check_resources, ensure_ray
    from rayapp.teachers.pool import engine_env

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    items, load_rejects = load_input(cfg)
    n = _check_input(cfg, items, load_rejects)  # same checks and messages as `rayapp validate`
    num_shards = -(-n // cfg.rows_per_shard)
    check_manifest(out, manifest(cfg, n), restart_on_change)
    write_resolved_config(cfg, out)
    done = done_shards(out, num_shards)
    pending: dict[int, list[dict]] = {k: [] for k in range(num_shards) if k not in done}
    expected = {k: min(cfg.rows_per_shard, n - k * cfg.rows_per_shard) for k in pending}
    for rej in load_rejects:
        k = rej["row"] // cfg.rows_per_shard
        if k in pending:
            pending[k].append({**rej, "status": "reject"})
    todo = [it for it in items if it["row"] // cfg.rows_per_shard in pending]
    where = {it["row"]: it["where"] for it in todo}
    log.info("%s: %d rows in %d shards; %d shards already written, %d rows to generate", cfg.name, n, num_shards, len(done), len(todo))

    rows_generated = 0
    last_shard = started
    if todo:
        ray = ensure_ray()
        model_dir = str(resolve_model(cfg.model.path))
        chat = wants_chat(cfg.chat, model_dir)
        lo, hi = cfg.concurrency
        eng = cfg.engine
        gpus = eng.tensor_parallel_size if eng.use_gpu else 0
        check_resources(cpus=lo * eng.cpus_per_engine, gpus=lo * gpus, what=f"{cfg.name} (concurrency min {lo} replicas)")
        ds = ray.data.from_items(
            [{"row": it["row"], "json": json.dumps(it["data"], ensure_ascii=False)} for it in todo],
            override_num_blocks=max(1, -(-len(todo) // cfg.batch_size)),
        )
        ds = ds.map_batches(
            GenerationStage,
            fn_constructor_kwargs={"model_dir": model_dir, "job": cfg.model_dump(), "chat": chat},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=eng.cpus_per_engine,
            num_gpus=gpus or None,
            runtime_env={"env_vars": engine_env(eng)},
        )
        for record in ds.iter_rows():
            result = json.loads(record["json"])
            result.setdefault("where", where.get(result["row"]))
            k = result["row"] // cfg.rows_per_shard
            pending[k].append(result)
            rows_generated += 1
            if len(pending[k]) == expected[k]:
                now = time.perf_counter()
                stats = write_shard(out, k, pending.pop(k), now - last_shard)
                last_shard = now
                log.info("shard %d/%d written: %d rows, %d rejected (%.1f rows/s so far)", k + 1, num_shards,
                         stats["written"], stats["rows_in"] - stats["written"], rows_generated / (time.perf_counter() - started))
    for k in list(pending):  # shards whose rows were all rejected at load time
        if len(pending[k]) == expected[k]:
            write_shard(out, k, pending.pop(k))
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their rows; re-run to finish them")
    total = assemble(out, num_shards)
    seconds = time.perf_counter() - started
    summary = {
        "output": str(out / "output.jsonl"), "rows_in": n, "written": total["written"], "rejected": n - total["written"],
        "shards": num_shards, "shards_skipped": len(done), "rows_generated": rows_generated,
        "seconds": round(seconds, 1), "rows_per_s": round(rows_generated / seconds, 2) if rows_generated else 0.0,
    }
    summary.update({k: v for k, v in total.items() if k not in summary and k not in ("rows_in", "tokens", "shards")})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

