"""Teacher output for distillation, computed on the driver before training and cached as files
in ``output_dir/teacher/`` (teacher output is data: a re-run with the same teacher weights,
template, sampling and inputs reads the files instead of starting an engine).

* ``teacher_rationales``: (label, rationale) per input row for step_by_step, through
  ``rayapp.teachers.rationales.generate_rationales`` on a :class:`VLLMEnginePool`.
* ``teacher_responses``: teacher-written responses for sequence-level KD (logits, responses: teacher).
* ``teacher_topk``: the teacher's top-k log-probs at every response position of tokenized
  sequences (vLLM prompt_logprobs through ``VLLMEnginePool.score_top_k``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rayapp.data.readers import read_jsonl
from rayapp.errors import UserError


class TeacherDataError(UserError, ValueError):
    pass


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_stamp(model_dir: str | None) -> list | None:
    """What identifies a teacher's weights without reading them: the path, and each weight and config
    file's name, size and modification time. A teacher retrained into the same directory gets a
    new stamp, so its cached output is not reused."""
    if model_dir is None:
        return None
    files = sorted(f for pattern in ("*.safetensors", "config.json", "tokenizer*.json") for f in Path(model_dir).glob(pattern))
    return [str(model_dir)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def teacher_model_dir(cfg) -> str | None:
    """teacher.path as a local directory (built-in models built once), or None when unset; a
    missing directory raises an error naming teacher.path."""
    from rayapp.models.io import resolve_model

    return str(resolve_model(cfg.teacher.path, "teacher.path")) if cfg.teacher.path else None


def _cached(path: Path, key: str) -> list | None:
    meta = path.with_suffix(".meta.json")
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("fingerprint") == key:
        return read_jsonl(path)
    return None


def _store(path: Path, key: str, rows: list, info: dict) -> None:
    from rayapp.data.readers import write_jsonl_atomic
    from rayapp.training.common import write_json_atomic

    write_jsonl_atomic(path, rows)
    write_json_atomic(path.with_suffix(".meta.json"), {"fingerprint": key, **info})


def teacher_pool(cfg, name: str = "teacher"):
    from rayapp.teachers.pool import VLLMEnginePool

    if cfg.teacher.path is None:
        raise TeacherDataError(f"method: {cfg.method} needs teacher output here but teacher.path is not set; set teacher.path")
    return VLLMEnginePool(cfg.teacher.path, cfg.teacher.engine, name=name)


def rationale_template(cfg):
    from rayapp.teachers.templates import get_template

    r = cfg.teacher.rationales
    shots = [s.model_dump() for s in r.shots] if r.shots is not None else None
    return get_template(cfg.task_type, r.system, shots)


def teacher_rationales(cfg, inputs: list[dict], out: Path, source: str) -> tuple[list[dict], dict]:
    """Teacher-output rows for ``inputs`` ({input_text, output_text?}); cached in out/teacher/rationales.jsonl."""
    from rayapp.teachers.rationales import generate_rationales

    template = rationale_template(cfg)
    r = cfg.teacher.rationales
    teacher_dir = teacher_model_dir(cfg)
    key = fingerprint(model_stamp(teacher_dir), template.label, cfg.teacher.chat, cfg.teacher.sampling.model_dump(), r.model_dump(), inputs)
    path = out / "teacher" / "rationales.jsonl"
    rows = _cached(path, key)
    if rows is not None:
        stats = json.loads(path.with_suffix(".meta.json").read_text())["stats"]
        print(f"[{cfg.name}] teacher rationales: reusing {path} ({len(rows)} rows)", flush=True)
        return rows, stats
    if teacher_dir is None:
        raise TeacherDataError(
            f"{source}: {len(inputs)} row(s) need a teacher label or rationale but teacher.path is not set; "
            "set teacher.path, or give teacher.outputs a teacher-output file (kind: batch, task: rationales)"
        )
    chat = cfg.teacher.chat == "always" or (cfg.teacher.chat == "auto" and _has_chat_template(teacher_dir))
    started = time.perf_counter()
    with teacher_pool(cfg) as pool:
        rows, stats = generate_rationales(pool, inputs, template, cfg.teacher.sampling, r.self_consistency_n,
                                          r.gold_filter, chat, teacher_model=cfg.teacher.path)
    stats["seconds"] = round(time.perf_counter() - started, 1)  # engine start included; kept with the cache
    _store(path, key, rows, {"stats": stats, "source": source})
    return rows, stats


def _has_chat_template(model_dir: str) -> bool:
    from rayapp.models.io import load_tokenizer

    return bool(getattr(load_tokenizer(model_dir), "chat_template", None))


def teacher_responses(cfg, prompts: list[str], out: Path) -> list[str]:
    """Teacher-written responses to ``prompts`` (user turns); cached in out/teacher/responses.jsonl."""
    key = fingerprint(model_stamp(teacher_model_dir(cfg)), cfg.teacher.sampling.model_dump(), prompts)
    path = out / "teacher" / "responses.jsonl"
    rows = _cached(path, key)
    if rows is None:
        with teacher_pool(cfg) as pool:
            chat = _has_chat_template(pool.model_path)
            asks = [[{"role": "user", "content": p}] if chat else p for p in prompts]
            rows = [{"input_text": p, "output_text": c.text, "finish_reason": c.finish_reason}
                    for p, c in zip(prompts, pool.generate(asks, cfg.teacher.sampling), strict=True)]
        _store(path, key, rows, {"teacher": cfg.teacher.path, "sampling": cfg.teacher.sampling.model_dump()})
    return [r["output_text"] for r in rows]


def topk_from_scores(scored: list[dict[int, float]], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM returns per position the top-k tokens plus the given token (k or k + 1 entries);
    keep the k most likely, distinct ids, sorted by log-prob (the maths needs exactly k distinct ids)."""
    ids, lps = [], []
    for pos in scored:
        best = sorted(pos.items(), key=lambda kv: -kv[1])[:k]
        ids.append([int(t) for t, _ in best])
        lps.append([float(v) for _, v in best])
    return ids, lps


def teacher_topk(cfg, sequences: list[list[int]], out: Path, pool=None, tag: str = "topk") -> list[dict]:
    """Per sequence {ids, logprobs}: (len - 1) x k teacher top-k for each next-token position.
    Cached in out/teacher/<tag>.jsonl; ``pool`` reuses a running teacher pool."""
    k = cfg.logits.top_k
    key = fingerprint(model_stamp(teacher_model_dir(cfg)), k, sequences)
    path = out / "teacher" / f"{tag}.jsonl"
    rows = _cached(path, key)
    if rows is not None:
        return rows
    own = pool is None
    pool = pool or teacher_pool(cfg)
    try:
        scored = pool.score_top_k(sequences, k)
    finally:
        if own:
            pool.shutdown()
    rows = []
    for per_seq in scored:
        ids, lps = topk_from_scores(per_seq, k)
        rows.append({"ids": ids, "logprobs": lps})
    short = [len(i) for r in rows for i in r["ids"] if len(i) < k]
    if short:
        raise TeacherDataError(f"the teacher returned fewer than logits.top_k={k} log-probs at some positions; lower logits.top_k")
    _store(path, key, rows, {"teacher": cfg.teacher.path, "top_k": k, "sequences": len(sequences)})
    return rows
