"""`kind: evaluate` — compare models on a held-out set: accuracy, prompt tokens and latency per request.

Every model answers the same questions greedily (transformers, batched) and is scored with the
task's answer matcher (rayapp.evaluation). Prompt tokens per request count what the model reads,
so a few-shot prompted base model shows what its accuracy costs; latency per request is measured
by sending ``latency_samples`` questions one at a time. The most accurate of ``select_best``
becomes ``output_dir/best_model`` (a symlink) for a deploy stage to serve.
"""

from __future__ import annotations

import html
import os
import statistics
import time
from pathlib import Path

from rayapp.training.common import write_json_atomic


def _few_shot_prefix(path: str, k: int) -> str:
    from rayapp.data.readers import read_rows

    shots = []
    for row in read_rows(path, max_rows=k):
        shots.append(f"Question: {row.data['input_text']}\nAnswer: {row.data['output_text']}")
    return "\n\n".join(shots) + "\n\nQuestion: "


def _prompt_fn(m, cfg):
    if m.few_shot:
        prefix = _few_shot_prefix(cfg.few_shot_file, m.few_shot)
        return lambda q: f"{prefix}{q}\nAnswer:"
    return lambda q: f"{m.prefix}{q}"


def evaluate_model(m, cfg, rows: list[dict]) -> dict:
    from rayapp.evaluation import evaluate_answers, render_prompts
    from rayapp.models.io import load_tokenizer, resolve_model

    path = str(resolve_model(m.path))
    prompt_fn = _prompt_fn(m, cfg)
    t0 = time.perf_counter()
    res = evaluate_answers(path, rows, task_type=cfg.task_type, prompt_fn=prompt_fn, extract=m.extract, max_new_tokens=m.max_new_tokens)
    batch_wall = time.perf_counter() - t0
    tok = load_tokenizer(path)
    prompts = render_prompts(tok, [prompt_fn(r["input_text"]) for r in rows])
    prompt_tokens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    latencies = _latencies(path, prompts[: cfg.latency_samples], m.max_new_tokens)
    return {
        "name": m.name, "model": path, "accuracy": res["accuracy"], "correct": res["correct"], "n": res["n"],
        "prompt_tokens_per_request": statistics.mean(prompt_tokens),
        "latency_s_per_request": statistics.median(latencies) if latencies else None,
        "batch_wall_s": round(batch_wall, 2), "samples": res["samples"][:4],
    }


def _latencies(path: str, prompts: list[str], max_new_tokens: int) -> list[float]:
    """Seconds per request, one request at a time, with the model already loaded."""
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(time.perf_counter() - t)
    return out


def validate(cfg) -> str:
    from rayapp.evaluation import load_eval_rows

    rows = load_eval_rows(cfg.data, cfg.max_examples, cfg.task_type)
    return f"{cfg.data}: {len(rows)} evaluation rows; models: {', '.join(m.name for m in cfg.models)}"


def table(results: list[dict]) -> str:
    lines = [f"{'model':<22}{'accuracy':>10}{'prompt tok/req':>16}{'latency s/req':>15}"]
    for r in results:
        lat = f"{r['latency_s_per_request']:.3f}" if r["latency_s_per_request"] is not None else "-"
        lines.append(f"{r['name']:<22}{r['accuracy']:>10.3f}{r['prompt_tokens_per_request']:>16.1f}{lat:>15}")
    return "\n".join(lines)


def _plot(results: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=110)
    names = [r["name"] for r in results]
    for ax, key, title in zip(axes, ("accuracy", "prompt_tokens_per_request", "latency_s_per_request"),
                              ("accuracy", "prompt tokens / request", "latency s / request"), strict=True):
        ax.bar(names, [r[key] or 0 for r in results], color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def run(cfg) -> dict:
    from rayapp.evaluation import load_eval_rows
    from rayapp.training.report import write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_eval_rows(cfg.data, cfg.max_examples, cfg.task_type)
    results = []
    for m in cfg.models:
        r = evaluate_model(m, cfg, rows)
        print(f"[{cfg.name}] {m.name}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']})", flush=True)
        results.append(r)
    text = table(results)
    print(text, flush=True)
    best = None
    candidates = [r for r in results if r["name"] in cfg.select_best]
    if candidates:
        best = max(candidates, key=lambda r: r["accuracy"])
        link = out / "best_model"
        tmp = out / ".best_model.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.abspath(best["model"]), tmp)
        os.replace(tmp, link)
    write_json_atomic(out / "eval.json", {"data": cfg.data, "task_type": cfg.task_type, "results": results, "best": best and best["name"]})
    png = _plot(results, out / "plots" / "comparison.png")
    samples = "".join(
        f"<h3>{html.escape(r['name'])}</h3><pre>"
        + "\n\n".join(f"Q: {s['input_text']}\ngold: {s['gold']}  pred: {s['pred']}  {'✓' if s['correct'] else '✗'}\n{s['completion'].strip()}" for s in r["samples"])
        + "</pre>"
        for r in results
    )
    report = write_report(
        out, title=f"{cfg.name}: held-out comparison", evaluation=None,
        sections=[
            ("Comparison", f"<pre>{html.escape(text)}</pre><img src='plots/{png.name}' alt='comparison'>"),
            ("Sample answers", samples),
        ],
    )
    summary = {"report": str(report), "table": "\n" + text}
    if best:
        summary.update({"best": best["name"], "best_model": str(out / "best_model")})
    return summary
