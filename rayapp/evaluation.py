"""Answer accuracy of a model directory on held-out rows: generate greedily, extract the answer,
compare it with the gold label using the task's matcher (``rayapp.teachers.templates.answers_match``:
numbers numerically, choices by letter, yes/no normalised, free text ignoring case, punctuation
and articles).

Generic on purpose: ``prompt_fn`` turns a row's ``input_text`` into what the model is asked
(a task prefix for a step-by-step student, a few-shot chain-of-thought prompt for a teacher),
and ``extract`` says whether the whole completion is the answer ("answer"), a rationale
ending in an answer marker ("rationale", parsed with ``parse_rationale``), or either ("auto").

Two backends: "transformers" (batched greedy ``generate`` in this process; no extra processes,
cheap for small models) and "vllm" (a :class:`VLLMEnginePool`, or any ``Generator`` passed in).

``kind: evaluate`` (:func:`run`) compares models on one held-out set: accuracy with its 95% Wilson
interval, prompt tokens and latency per request. Every model answers the same questions greedily
(transformers, batched, or a vLLM engine: ``models[].backend``) and is scored as above. Prompt
tokens per request count what the model reads, so a few-shot prompted base model shows what its
accuracy costs; latency per request is measured the same way for every model, with transformers,
by sending ``latency_samples`` questions one at a time. ``claims`` (model vs model: an accuracy
ratio or margin, a prompt-token or latency ratio) are checked against the table and printed under
it, with whether each holds. The most accurate of ``select_best`` becomes ``output_dir/best_model``
(a symlink) for a deploy stage to serve.
"""

from __future__ import annotations

import html
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rayapp.errors import UserError
from rayapp.fileio import write_json_atomic


class EvaluationError(UserError, ValueError):
    pass


def load_eval_rows(path: str | Path, max_examples: int | None = None, task_type: str = "free") -> list[dict]:
    """Rows {input_text, label} of a held-out file; every row must have output_text or label. A
    worked answer ("... So the answer is 89.") is reduced to its final answer."""
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.teachers.templates import parse_rationale

    records, _ = load_distill_inputs(path)
    rows = []
    for i, r in enumerate(records):
        if r.label is None:
            raise EvaluationError(
                f"{path}: row {i + 1} has no output_text/label; every evaluation row needs the gold answer "
                "(give evaluation.data a labelled file)"
            )
        rows.append({"input_text": r.input_text, "label": parse_rationale(r.label, task_type)[1] or r.label})
    return rows[:max_examples] if max_examples else rows


def render_prompts(tokenizer, prompts: list, chat_template: str = "auto") -> list[str]:
    """The text the model continues. A string becomes the chat template's user turn + generation
    prompt when the tokenizer has one (as ``rayapp.data.tokenize.encode_example`` renders training
    rows), else stays as is; a list of messages is rendered with the template."""
    from rayapp.data.tokenize import use_chat_template

    templated = use_chat_template(tokenizer, chat_template)
    out = []
    for p in prompts:
        if isinstance(p, str) and not templated:
            out.append(p)
            continue
        messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def generate_transformers(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 32,
                          batch_size: int = 32, dtype: str = "float32", add_special_tokens: bool = False) -> list[str]:
    """Greedy completions of already-rendered prompts, batched with left padding."""
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    tok.padding_side = "left"
    model = load_causal_lm(str(model_dir), dtype).eval()
    stop_ids = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    outs: list[str] = []
    with torch.no_grad():
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k : k + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids or None,
                                 pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs


def generate_vllm(model_dir: str | Path, prompts: list, max_new_tokens: int = 32, engine=None, generator=None) -> list[str]:
    """Greedy completions from a vLLM engine pool (started here and shut down unless ``generator`` is given)."""
    from rayapp.config.base import EngineConfig, SamplingConfig

    sampling = SamplingConfig(temperature=0.0, max_tokens=max_new_tokens)
    if generator is not None:
        return [c.text for c in generator.generate(prompts, sampling)]
    from rayapp.teachers.pool import VLLMEnginePool

    with VLLMEnginePool(model_dir, engine or EngineConfig(max_model_len=512), name="evaluation") as pool:
        return [c.text for c in pool.generate(prompts, sampling)]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion correct / n; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def score_answers(rows: list[dict], completions: list[str], task_type: str, extract: str = "answer") -> dict:
    """Compare completions with the rows' gold labels. Returns accuracy, correct, n and a few samples."""
    from rayapp.teachers.templates import answers_match, normalize_label, parse_rationale

    if extract not in ("answer", "rationale", "auto"):
        raise ValueError(f"extract must be 'answer', 'rationale' or 'auto', got {extract!r}")
    correct, samples = 0, []
    for row, text in zip(rows, completions, strict=True):
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        if extract == "rationale":
            pred = parse_rationale(text, task_type)[1]
        elif extract == "answer":
            pred = normalize_label(first_line, task_type)
        else:  # auto: an answer marker when there is one, else the first line
            pred = parse_rationale(text, task_type)[1] or normalize_label(first_line, task_type)
        ok = answers_match(pred, row["label"], task_type)
        correct += int(ok)
        if len(samples) < 8:
            samples.append({"input_text": row["input_text"], "gold": row["label"], "completion": text, "pred": pred, "correct": ok})
    n = len(rows)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "ci95": list(wilson_interval(correct, n)), "samples": samples}


def evaluate_answers(model_dir: str | Path, rows: list[dict], *, task_type: str = "free",
                     prompt_fn: Callable[[str], str | list[dict]] = lambda x: x, extract: str = "answer",
                     max_new_tokens: int = 32, backend: str = "transformers", chat_template: str = "auto",
                     engine=None, generator=None) -> dict:
    """Answer accuracy of ``model_dir`` on ``rows`` ({input_text, label}); see the module docstring."""
    from rayapp.data.tokenize import use_chat_template
    from rayapp.models.io import load_tokenizer

    if not rows:
        raise EvaluationError("no evaluation rows: give evaluation.data a labelled file with at least one row")
    tok = load_tokenizer(str(model_dir))
    texts = [prompt_fn(r["input_text"]) for r in rows]
    templated = use_chat_template(tok, chat_template)
    if backend == "transformers":
        prompts = render_prompts(tok, texts, chat_template)  # plain text rows were tokenized with special tokens
        completions = generate_transformers(model_dir, prompts, max_new_tokens, add_special_tokens=not templated)
    elif backend == "vllm":
        # Templated prompts go to the engine as messages: it renders them and encodes without adding
        # special tokens again (a rendered string would be encoded with them: two BOS on tokenizers
        # that add one and whose template starts with it, unlike the transformers backend).
        engine_prompts = [[{"role": "user", "content": t}] if templated and isinstance(t, str) else t for t in texts]
        completions = generate_vllm(model_dir, engine_prompts, max_new_tokens, engine, generator)
    else:
        raise ValueError(f"unknown evaluation backend {backend!r}; expected 'transformers' or 'vllm'")
    result = score_answers(rows, completions, task_type, extract)
    result.update({"backend": backend, "model": str(model_dir)})
    return result


# -- kind: evaluate ------------------------------------------------------------------------------

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
    from rayapp.models.io import load_tokenizer, resolve_model

    rows = rows[: m.max_examples] if m.max_examples else rows
    path = str(resolve_model(m.path))
    prompt_fn = _prompt_fn(m, cfg)
    t0 = time.perf_counter()
    res = evaluate_answers(path, rows, task_type=cfg.task_type, prompt_fn=prompt_fn, extract=m.extract, max_new_tokens=m.max_new_tokens,
                           backend=m.backend, engine=cfg.engine)
    batch_wall = time.perf_counter() - t0
    tok = load_tokenizer(path)
    prompts = render_prompts(tok, [prompt_fn(r["input_text"]) for r in rows])
    prompt_tokens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    latencies = _latencies(path, prompts[: cfg.latency_samples], m.max_new_tokens)
    return {
        "name": m.name, "model": path, "accuracy": res["accuracy"], "correct": res["correct"], "n": res["n"], "ci95": res["ci95"],
        "prompt_tokens_per_request": statistics.mean(prompt_tokens),
        "latency_s_per_request": statistics.median(latencies) if latencies else None,
        "backend": m.backend, "batch_wall_s": round(batch_wall, 2), "samples": res["samples"][:4],
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
    rows = load_eval_rows(cfg.data, cfg.max_examples, cfg.task_type)
    return f"{cfg.data}: {len(rows)} evaluation rows; models: {', '.join(m.name for m in cfg.models)}"


def table(results: list[dict]) -> str:
    width = max([22, *(len(r["name"]) + 2 for r in results)])
    lines = [f"held-out questions: {max(r['n'] for r in results)} (n: how many each model answered); "
             "accuracy with its 95% (Wilson) interval",
             f"{'model':<{width}}{'n':>5}{'accuracy':>9}{'95% interval':>16}{'prompt tok/req':>16}{'latency s/req':>15}"]
    for r in results:
        lat = f"{r['latency_s_per_request']:.3f}" if r["latency_s_per_request"] is not None else "-"
        lo, hi = r["ci95"]
        lines.append(f"{r['name']:<{width}}{r['n']:>5}{r['accuracy']:>9.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}"
                     f"{r['prompt_tokens_per_request']:>16.1f}{lat:>15}")
    return "\n".join(lines)


_METRIC_KEYS = {"accuracy": "accuracy", "prompt_tokens": "prompt_tokens_per_request", "latency": "latency_s_per_request"}
_METRIC_WORDS = {"accuracy": "accuracy", "prompt_tokens": "prompt tokens/request", "latency": "latency/request"}


def check_claims(claims, results: list[dict]) -> list[dict]:
    """Each claim against the measured table: its statement, the measured ratio or margin, and whether it holds
    (None when a value was not measured, e.g. latency with latency_samples: 0)."""
    by_name = {r["name"]: r for r in results}
    out = []
    for c in claims:
        a, b = by_name[c.model][_METRIC_KEYS[c.metric]], by_name[c.versus][_METRIC_KEYS[c.metric]]
        what = _METRIC_WORDS[c.metric]
        if c.margin_at_least is not None:
            statement = f"{c.model} {what} >= {c.versus} {'+' if c.margin_at_least >= 0 else '-'} {abs(c.margin_at_least):g}"
            measured = None if a is None or b is None else a - b
            holds = None if measured is None else measured >= c.margin_at_least - 1e-12
            shown = "-" if measured is None else f"{measured:+.3f}"
        else:
            bound = c.ratio_at_least if c.ratio_at_least is not None else c.ratio_at_most
            statement = f"{c.model} {what} {'>=' if c.ratio_at_least is not None else '<='} {bound:g} x {c.versus}"
            measured = None if a is None or not b else a / b
            if measured is None:
                holds = None
            elif c.ratio_at_least is not None:
                holds = measured >= c.ratio_at_least - 1e-12
            else:
                holds = measured <= c.ratio_at_most + 1e-12
            shown = "-" if measured is None else f"{measured:.3f} x"
        out.append({"claim": statement, "model": c.model, "versus": c.versus, "metric": c.metric, "measured": measured,
                    "holds": holds, "shown": shown, "otherwise": c.otherwise if holds is False else ""})
    return out


def claims_table(checked: list[dict]) -> str:
    if not checked:
        return ""
    width = max(len(c["claim"]) for c in checked) + 2
    lines = [f"{'claim':<{width}}{'measured':>12}{'holds':>7}"]
    for c in checked:
        verdict = {True: "yes", False: "NO", None: "-"}[c["holds"]]
        lines.append(f"{c['claim']:<{width}}{c['shown']:>12}{verdict:>7}")
        if c["otherwise"]:
            lines.extend("  " + line for line in c["otherwise"].strip().splitlines())
    return "\n".join(lines)


def _plot(results: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=110)
    names = [r["name"] for r in results]
    for ax, key, title in zip(axes, ("accuracy", "prompt_tokens_per_request", "latency_s_per_request"),
                              ("accuracy", "prompt tokens / request", "latency s / request"), strict=True):
        yerr = None
        if key == "accuracy":  # the 95% interval as an error bar
            yerr = [[r["accuracy"] - r["ci95"][0] for r in results], [r["ci95"][1] - r["accuracy"] for r in results]]
        ax.bar(names, [r[key] or 0 for r in results], color="#4c72b0", yerr=yerr, capsize=3 if yerr else 0)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def run(cfg) -> dict:
    from rayapp.config.loader import write_resolved_config
    from rayapp.report import write_report

    out = Path(cfg.output_dir)
    write_resolved_config(cfg, out)
    rows = load_eval_rows(cfg.data, cfg.max_examples, cfg.task_type)
    results = []
    for m in cfg.models:
        r = evaluate_model(m, cfg, rows)
        lo, hi = r["ci95"]
        print(f"{cfg.name}: {m.name}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}, 95% interval {lo:.3f}-{hi:.3f}; "
              f"{m.backend} {r['batch_wall_s']:.0f} s)", flush=True)
        results.append(r)
    checked = check_claims(cfg.claims, results)
    text = table(results) + ("\n\n" + claims_table(checked) if checked else "")
    from rayapp.console import say

    say(text)
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
    write_json_atomic(out / "eval.json", {"data": cfg.data, "task_type": cfg.task_type, "results": results, "claims": checked,
                                          "best": best and best["name"]})
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
