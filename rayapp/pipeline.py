"""`kind: pipeline` — run named stages in order, skipping the ones already done.

Each stage is a job of another kind, run by that kind's recipe. After a stage succeeds its
output directory gets ``.stage.json`` with a fingerprint of what it was run from: the resolved
stage config, the content of the input files it names, and the fingerprints of the stages it
reads from. A re-run skips a stage whose fingerprint is unchanged, so editing one stage re-runs
it and everything downstream of it, and nothing else. A failing stage stops the pipeline with
its error; finished stages keep their outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from rayapp import kinds
from rayapp.config import load_job_dict, write_resolved_config
from rayapp.console import say
from rayapp.errors import UserError
from rayapp.fileio import write_json_atomic

STATE_FILE = ".stage.json"


class StageFailed(UserError):
    pass


def _file_digest(path: Path, h) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(str(p.relative_to(path)).encode())
                h.update(str(p.stat().st_size).encode())
                h.update(str(int(p.stat().st_mtime)).encode())


def _input_paths(value, inside: list[Path]) -> list[Path]:
    """Existing files / dirs named in a stage config, except those inside pipeline stage outputs."""
    found: list[Path] = []
    if isinstance(value, str) and len(value) < 4096 and "\n" not in value and ("/" in value or value.endswith((".jsonl", ".parquet"))):
        p = Path(value)
        try:
            exists = p.exists()
        except OSError:  # prose that merely contains a '/' (a name too long for a path, ...)
            exists = False
        if exists and not any(p.resolve().is_relative_to(d) for d in inside):
            found.append(p)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k != "output_dir":
                found += _input_paths(v, inside)
    elif isinstance(value, list):
        for v in value:
            found += _input_paths(v, inside)
    return found


def stage_fingerprint(cfg, name: str, upstream: dict[str, str]) -> str:
    stage = cfg.resolved_stage(name)
    h = hashlib.sha256(json.dumps(stage, sort_keys=True, default=str).encode())
    stage_dirs = [Path(cfg.stage_output_dir(s)).resolve() for s in cfg.stages]
    for p in sorted(set(_input_paths(stage, stage_dirs))):
        h.update(str(p).encode())
        _file_digest(p, h)
    for dep in cfg.dependencies(name):
        h.update(f"{dep}={upstream.get(dep, '')}".encode())
    return h.hexdigest()[:16]


def _read_state(out: Path) -> dict | None:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _supersede_checkpoints(out: Path, state: dict | None, fp: str) -> None:
    """A stage that runs again because its config or inputs changed starts over: the checkpoints
    its training job would resume from were written by the earlier config (another model, other
    data), so they move to ``checkpoints.superseded/`` (the previous superseded set is dropped).
    A stage re-run with the same fingerprint (killed or failed before) resumes from them."""
    if state is None or state.get("fingerprint") == fp:
        return
    from rayapp.training.launch import CHECKPOINT_RUN_NAME  # where every training job keeps its checkpoints

    ckpts = out / CHECKPOINT_RUN_NAME
    if not ckpts.is_dir() or not any(ckpts.iterdir()):
        return
    old = out / f"{CHECKPOINT_RUN_NAME}.superseded"
    shutil.rmtree(old, ignore_errors=True)
    ckpts.rename(old)
    say(f"[{out.name}] its config or inputs changed since its checkpoints were written: starting over "
        f"(the old checkpoints are in {old})")


def validate(cfg) -> str:
    lines = []
    for name in cfg.stages:
        stage_cfg = load_job_dict(cfg.resolved_stage(name), source=f"stages.{name}")
        deps = cfg.dependencies(name)
        lines.append(f"stage {name} ({stage_cfg.kind})" + (f" <- {', '.join(deps)}" if deps else ""))
        if not deps:  # later stages read files that earlier stages have not written yet
            report = kinds.recipe(stage_cfg.kind).validate(stage_cfg)
            if report:
                lines.extend("  " + line for line in report.splitlines())
    return "\n".join(lines)


# Result keys the pipeline has said already (the timing table, the asked question): `rayapp run`
# does not repeat them.
SAID_KEYS = ("wall_time_s", "endpoint", "served_model", "question", "answer", "gold", "correct")


def run(cfg) -> dict:
    out = Path(cfg.output_dir)
    write_resolved_config(cfg, out)
    names = list(cfg.stages)
    serves = any(s.get("kind") == "deploy" or (s.get("deploy") or {}).get("enabled") for s in cfg.stages.values())
    if serves and not os.environ.get("RAY_ADDRESS"):
        # A deployment must outlive this process: run every stage on the persistent local head
        # (`rayapp deploy --status / --shutdown` see and stop it afterwards).
        from rayapp.serving.local_head import ensure_local_head

        say(f"[{cfg.name}] using the local Ray head at {ensure_local_head()} (it keeps serving after the pipeline)")
    fingerprints: dict[str, str] = {}
    timings: dict[str, dict] = {}
    t_pipeline = time.perf_counter()
    for i, name in enumerate(names, start=1):
        stage_dict = cfg.resolved_stage(name)
        stage_cfg = load_job_dict(stage_dict, source=f"stages.{name}")
        stage_out = Path(cfg.stage_output_dir(name))
        fp = stage_fingerprint(cfg, name, fingerprints)
        fingerprints[name] = fp
        header = f"== stage {i}/{len(names)}: {name} ({stage_cfg.kind}) "
        state = _read_state(stage_out)
        if cfg.only is not None and name not in cfg.only:
            say(f"{header}— not selected (only: {cfg.only})")
            continue
        if cfg.skip_finished and state and state.get("status") == "succeeded" and state.get("fingerprint") == fp:
            say(f"{header}— done before with the same inputs, skipped ({state.get('wall_s', 0):.0f} s then)")
            timings[name] = {"kind": stage_cfg.kind, "status": "skipped", "wall_s": state.get("wall_s"), "summary": state.get("summary", {})}
            continue
        say(f"{header}{'=' * max(0, 60 - len(header))}")
        _supersede_checkpoints(stage_out, state, fp)
        stage_out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_out / STATE_FILE, {"status": "running", "fingerprint": fp, "started_at": time.time()})
        t0 = time.perf_counter()
        try:
            summary = kinds.run(stage_cfg) or {}
        except Exception as e:
            wall = time.perf_counter() - t0
            timings[name] = {"kind": stage_cfg.kind, "status": "failed", "wall_s": round(wall, 1), "error": str(e)}
            write_json_atomic(out / "pipeline.json", {"name": cfg.name, "stages": timings})
            done = [n for n, t in timings.items() if t["status"] in ("succeeded", "skipped")]
            raise StageFailed(
                f"stage '{name}' ({stage_cfg.kind}) failed after {wall:.0f} s: {type(e).__name__}: {e}\n"
                f"  finished stages keep their outputs ({', '.join(done) or 'none'}); fix the problem and re-run: "
                f"finished stages are skipped"
            ) from e
        wall = time.perf_counter() - t0
        stage_out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            stage_out / STATE_FILE,
            {"status": "succeeded", "fingerprint": fp, "wall_s": round(wall, 1), "summary": summary, "finished_at": time.time()},
        )
        timings[name] = {"kind": stage_cfg.kind, "status": "succeeded", "wall_s": round(wall, 1), "summary": summary}
    total = time.perf_counter() - t_pipeline
    write_json_atomic(out / "pipeline.json", {"name": cfg.name, "wall_s": round(total, 1), "stages": timings})
    say(_timing_table(timings, total))
    result = {"pipeline": str(out / "pipeline.json"), "wall_time_s": round(total, 1)}
    if cfg.ask is not None and cfg.ask.stage not in timings:
        say(f"\nask: stage '{cfg.ask.stage}' was not selected (only: {cfg.only}); no question asked")
    elif cfg.ask is not None:
        asked = ask_deployed(cfg.ask, timings.get(cfg.ask.stage, {}).get("summary", {}), cfg.ask_file())
        write_json_atomic(out / "pipeline.json", {"name": cfg.name, "wall_s": round(total, 1), "stages": timings, "ask": asked})
        result.update(asked)
    for name, t in timings.items():
        for key in ("table", "report", "endpoint", "served_model", "answer"):
            if key in t.get("summary", {}):
                result[f"{name}.{key}"] = t["summary"][key]
    return result


def ask_deployed(ask, deploy_summary: dict, from_file: str | None = None) -> dict:
    """POST one chat completion to a deploy stage's endpoint (plain HTTP, as any client would). With
    ``from_file`` the question is that held-out file's row ``ask.row``, and the answer is checked
    against its gold answer."""
    import urllib.request

    url, model = deploy_summary.get("deploy_url"), deploy_summary.get("deploy_model_name")
    if not url or not model:
        raise StageFailed(f"ask: stage '{ask.stage}' recorded no endpoint (deploy_url / deploy_model_name)")
    question, gold = ask.question, None
    if from_file:
        from rayapp.evaluation import load_eval_rows

        rows = load_eval_rows(from_file, None, ask.task_type)
        if ask.row >= len(rows):
            raise StageFailed(f"ask.row: {ask.row}, but {from_file} has {len(rows)} rows")
        question, gold = rows[ask.row]["input_text"], rows[ask.row]["label"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ask.prefix + question}],
        "max_tokens": ask.max_tokens,
        "temperature": 0,
    }
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{url.rstrip('/')}/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())["choices"][0]["message"]["content"]
    answer = answer.strip()
    result = {"endpoint": url, "served_model": model, "question": question, "answer": answer}
    if gold is None:
        say(f"\nasked {model} at {url}:\n  Q: {question}\n  A: {answer}")
        return result
    from rayapp.evaluation import score_answers

    scored = score_answers([{"input_text": question, "label": gold}], [answer], ask.task_type, "auto")
    right = bool(scored["correct"])
    say(f"\nasked {model} at {url} held-out question {ask.row} of {from_file}:\n  Q: {question}\n"
        f"  A: {answer}    gold: {gold}    {'right' if right else 'WRONG'}")
    return {**result, "gold": gold, "correct": right}


def _timing_table(timings: dict, total: float) -> str:
    lines = ["", f"{'stage':<16}{'kind':<14}{'status':<11}{'wall s':>8}"]
    for name, t in timings.items():
        wall = t.get("wall_s")
        lines.append(f"{name:<16}{t['kind']:<14}{t['status']:<11}{(f'{wall:.0f}' if wall is not None else '-'):>8}")
    lines.append(f"{'total':<41}{total:>8.0f}")
    return "\n".join(lines)
