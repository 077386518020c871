"""Distilling step-by-step vs standard fine-tuning at equal data: label accuracy of the student.

Task: reasoning-gym ``chain_sum`` (3 one-digit terms, e.g. ``4 - 1 - 7 =``), answers checked
numerically (``rayapp.teachers.templates.answers_match``). Four disjoint sets of questions: the
teacher's labeled set, the students' pool (unlabeled: the teacher labels it), 200 held-out test
questions, all drawn from reasoning-gym with fixed seeds.

Teacher (``--teacher model``, the default): a larger model (``--teacher-model``, the locally built
4-layer Llama, random init) tuned in this process on worked answers of its labeled set ("4 - 1 = 3.
3 - 7 = -4. So the answer is -4."), then served by the vLLM actor pool, which writes a rationale
and a label for every pool question through the distill recipe's own teacher path
(``rayapp.training.distill.teacher.teacher_rationales``, which runs the ``kind: batch`` code;
zero-shot, greedy, cached in ``--work``). The students see only the teacher's labels and rationales, mistakes included; the
gold answers of the pool are used only to report how often the teacher was right.
``--teacher oracle`` instead writes the partial sums programmatically (a teacher that is never
wrong), to separate the method from the teacher's errors.

For each training size N and seed, three students start from the same tiny model (the locally
built 2-layer Llama, random weights) and train for the same number of optimizer steps on the same
N teacher-labeled questions (VARIANTS): step-by-step as rayapp runs it by default
(``rationale_weight: 0.5``, the explain target ending "So the answer is <label>."), step-by-step
as the paper's reference code (``explain_target: rationale``, the rationale alone), and standard
fine-tuning on the teacher's labels (``rationale_weight: 0``). Accuracy: greedy
"predict: " answers on the held-out questions (the paper's inference mode); for the step-by-step
student also "explain: " then the answer after "So the answer is" (the rationale task asked for
at inference). Every student is trained by the distill recipe itself
(``rayapp.training.distill.recipe.run``), its workers in this process (``in_process=True``:
one worker, no Ray); ``--ray`` runs them on 2 Ray Train workers instead.

Writes bench/results/distill_quality.json ({"ratio": step-by-step acc / standard acc at the
smallest N, "target": 1.0, ...}), bench/results/distill_quality.png and distill_quality.html.

    .venv/bin/python bench/distill_quality.py [--sizes 250 500 1000 2000] [--steps 1500] [--seeds 0 1]
        [--teacher model|oracle] [--teacher-model tiny:layers=4,hidden=256] [--teacher-steps 2000]
        [--model tiny | DIR] [--ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ORACLE = {"model": "reasoning-gym:chain_sum (programmatic step-by-step partial sums)", "template": "none", "sampling": {}}


def make_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct questions not in ``exclude``: {input_text, gold, rationale} (the partial sums, "4 - 1 = 3. 3 - 7 = -4.")."""
    import reasoning_gym as rg

    from rayapp.data.dataset import chain_rationale

    ds = rg.create_dataset("chain_sum", size=8 * n + 400, seed=seed, min_terms=3, max_terms=3, min_digits=1, max_digits=1)
    rows, seen = [], set(exclude)
    for x in ds:
        expr = x["metadata"]["expression"]
        if f"{expr} =" in seen:
            continue
        seen.add(f"{expr} =")
        rows.append({"input_text": f"{expr} =", "gold": str(x["answer"]), "rationale": chain_rationale(expr)})
        if len(rows) == n:
            return rows
    raise SystemExit(f"chain_sum gave only {len(rows)} new questions of the {n} asked (seed {seed}); lower --sizes or --teacher-train")


def worked_answer(row: dict) -> str:
    """What the teacher is tuned to write: '4 - 1 = 3. 3 - 7 = -4. So the answer is -4.'"""
    from rayapp.data.formats import ANSWER_MARKER

    return f"{row['rationale']} {ANSWER_MARKER} {row['gold']}."


def oracle_rows(rows: list[dict]) -> list[dict]:
    """Teacher-output rows from the programmatic partial sums: always right."""
    return [{"input_text": r["input_text"], "label": r["gold"], "rationale": r["rationale"], "teacher": ORACLE} for r in rows]


def train_teacher(rows: list[dict], work: Path, model: str, steps: int, lr: float, seed: int) -> tuple[Path, float]:
    """Tune ``model`` on worked answers (chat template, as ``kind: sft`` does) in this process;
    reused from ``work`` when the same rows and settings trained it before. Returns (dir, seconds)."""
    import torch

    from rayapp.config.base import TrainConfig
    from rayapp.data.collate import collate_sft
    from rayapp.data.readers import write_jsonl_atomic
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model, save_model_atomic
    from rayapp.training.distill.teacher import fingerprint
    from rayapp.training.loop import LocalReporter, count_supervised, fit
    from rayapp.training.sft import sft_loss

    out = work / "teacher"
    key = fingerprint(model, steps, lr, seed, [(r["input_text"], worked_answer(r)) for r in rows])
    meta = out / "teacher.json"
    if (out / "model" / "config.json").exists() and meta.exists() and json.loads(meta.read_text())["fingerprint"] == key:
        print(f"teacher: reusing {out / 'model'}", flush=True)
        return out / "model", json.loads(meta.read_text())["seconds"]
    started = time.perf_counter()
    train_file = out / "train_cot.jsonl"
    write_jsonl_atomic(train_file, [{"input_text": r["input_text"], "output_text": worked_answer(r)} for r in rows])
    base = resolve_model(model)
    tok = load_tokenizer(base)
    data = load_sft_dataset(train_file, tok, None, 64)
    torch.manual_seed(seed)
    net = load_causal_lm(base)
    fit(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=lr), train_items=data.examples, val_items=None,
        collate=lambda it: collate_sft(it, tok.pad_token_id), count_fn=count_supervised, loss_fn=sft_loss,
        cfg=TrainConfig(max_steps=steps, global_batch_size=16, micro_batch_size=16, learning_rate=lr, warmup_ratio=0.05,
                        checkpoint_every=10**6, eval_every=10**6, log_every=100, seed=seed),
        micro_batch_size=16, reporter=LocalReporter(), metrics_path=out / "metrics.jsonl", name="teacher")
    model_dir = save_model_atomic(net, tok, out / "model")
    seconds = round(time.perf_counter() - started, 1)
    meta.write_text(json.dumps({"fingerprint": key, "seconds": seconds, "model": model, "steps": steps, "rows": len(rows)}))
    return model_dir, seconds


def teacher_label(teacher_dir: Path, rows: list[dict], work: Path) -> tuple[list[dict], dict]:
    """The teacher's vLLM pool writes label + rationale for ``rows`` given without their answers,
    through the distill recipe's teacher path (zero-shot, greedy; cached in work/labels/teacher/)."""
    from rayapp.config.loader import load_job_dict
    from rayapp.training.distill.teacher import teacher_rationales

    cfg = load_job_dict({
        "kind": "distill", "name": "teacher_labels", "method": "step_by_step", "task_type": "number",
        "teacher": {"path": str(teacher_dir), "sampling": {"temperature": 0.0, "max_tokens": 48},
                    "engine": {"max_model_len": 128, "max_num_seqs": 128, "kv_cache_gib": 1, "cpu_threads_bind": "all"},
                    "rationales": {"task_type": "number", "system": "", "shots": [], "gold_filter": "off"}},
        "output_dir": str(work / "labels"),
    })
    # stats["seconds"]: the generation that wrote the cache, also when this call reused it.
    outputs, stats = teacher_rationales(cfg, [{"input_text": r["input_text"]} for r in rows], work / "labels", "student pool")
    # TeacherOutput rows as the teacher-output file format (what the students' jobs read)
    return [{"input_text": o.input_text, "label": o.label, "rationale": o.rationale, "teacher": dataclasses.asdict(o.teacher)}
            for o in outputs], stats


# name -> (rationale_weight, explain_target, label in the table and plot)
VARIANTS = {
    "step_by_step": (0.5, "rationale_and_label", "step-by-step (explain: rationale + answer)"),
    "step_by_step_paper": (0.5, "rationale", "step-by-step, paper (explain: rationale)"),
    "standard": (0.0, "rationale", "standard fine-tuning (rationale_weight 0)"),
}


def job(out: Path, teacher_file: Path, variant: str, steps: int, seed: int, num_workers: int, model: str, lr: float) -> dict:
    rationale_weight, explain_target, _ = VARIANTS[variant]
    return {
        "kind": "distill", "name": out.name, "method": "step_by_step", "task_type": "number",
        "model": {"path": model, "max_seq_len": 64},
        "teacher": {"outputs": str(teacher_file)},
        "data": {"train": str(teacher_file), "chat_template": "never"},  # plain "predict: 4 - 1 - 7 =" + answer: short sequences
        "step_by_step": {"rationale_weight": rationale_weight, "explain_target": explain_target},
        "train": {"max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16 // num_workers, "learning_rate": lr,
                  "warmup_ratio": 0.05, "eval_every": 10_000, "checkpoint_every": 10_000, "log_every": 10, "seed": seed},
        "resources": {"num_workers": num_workers},
        "evaluation": {"max_examples": 200, "max_new_tokens": 6},
        "output_dir": str(out),
    }


def plot(results: list[dict], sizes: list[int], path: Path, title: str, teacher_accuracy: float | None = None,
         majority_accuracy: float | None = None) -> None:
    """Mean accuracy per size (lines), every seed's run (faint points), the teacher's accuracy and
    the always-the-most-common-answer baseline (grey lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    series = (("step_by_step", "accuracy", "C0", "o", "-", VARIANTS["step_by_step"][2] + ", predict"),
              ("step_by_step_paper", "accuracy", "C2", "o", "-", VARIANTS["step_by_step_paper"][2] + ", predict"),
              ("standard", "accuracy", "C1", "o", "-", VARIANTS["standard"][2]),
              ("step_by_step", "explain_accuracy", "C0", "s", "--", "step-by-step, explain then answer"))
    for variant, key, color, marker, style, name in series:
        runs = [r for r in results if r["variant"] == variant and key in r]
        means = [sum(r[key] for r in runs if r["n"] == n) / max(1, sum(1 for r in runs if r["n"] == n)) for n in sizes]
        ax.plot(sizes, means, marker=marker, linestyle=style, color=color, alpha=1.0 if style == "-" else 0.6, label=name)
        ax.scatter([r["n"] for r in runs], [r[key] for r in runs], color=color, marker=marker, s=12, alpha=0.3)
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="grey", linestyle=":", label=f"teacher ({teacher_accuracy:.2f})")
    if majority_accuracy is not None:
        ax.axhline(majority_accuracy, color="grey", linestyle="-.", label=f"most common answer ({majority_accuracy:.2f})")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training questions (same optimizer steps for every run)")
    ax.set_ylabel("label accuracy (200 held-out)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--model", default="tiny", help="student start: 'tiny', 'tiny:layers=4,hidden=256', or a directory")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher", choices=["model", "oracle"], default="model",
                    help="'model': a tuned teacher model labels the pool through vLLM; 'oracle': programmatic partial sums")
    ap.add_argument("--teacher-model", default="tiny:layers=4,hidden=256", help="the teacher before tuning")
    ap.add_argument("--teacher-train", type=int, default=1000, help="labeled questions the teacher is tuned on")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--ray", action="store_true", help="run the full recipe on 2 Ray Train workers")
    ap.add_argument("--work", default="outputs/bench_distill_quality")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from bench/results/distill_quality.json, no training")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "distill_quality.json").read_text())
        plot(saved["runs"], saved["sizes"], RESULTS / "distill_quality.png", saved["title"], saved.get("teacher_accuracy"),
             saved.get("majority_accuracy"))
        print(f"wrote {RESULTS / 'distill_quality.png'}")
        return
    import torch

    torch.set_num_threads(args.threads)

    from rayapp.config.loader import load_job_dict
    from rayapp.data.readers import write_jsonl_atomic
    from rayapp.evaluation import evaluate_answers
    from rayapp.teachers.rationales import REJECT_REASONS
    from rayapp.teachers.templates import answers_match
    from rayapp.training.distill.recipe import run

    t0 = time.perf_counter()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    test = make_rows(200, seed=12345)
    test_rows = [{"input_text": r["input_text"], "label": r["gold"]} for r in test]
    used = {r["input_text"] for r in test}
    teacher_info: dict = {"kind": args.teacher}
    if args.teacher == "model":
        labeled = make_rows(args.teacher_train, seed=4242, exclude=used)
        used |= {r["input_text"] for r in labeled}
        # 10% spare: the teacher may leave a few questions without a parsable answer.
        pool = make_rows(max(args.sizes) * 11 // 10, seed=777, exclude=used)
        teacher_dir, train_s = train_teacher(labeled, work, args.teacher_model, args.teacher_steps, args.teacher_lr, seed=0)
        t_acc = evaluate_answers(teacher_dir, test_rows, task_type="number", extract="rationale", max_new_tokens=40)
        print(f"teacher {args.teacher_model} tuned on {len(labeled)} worked answers, {args.teacher_steps} steps ({train_s}s): "
              f"held-out accuracy {t_acc['correct']}/{t_acc['n']} = {t_acc['accuracy']:.3f}", flush=True)
        rows, stats = teacher_label(teacher_dir, pool, work)
        gold = {r["input_text"]: r["gold"] for r in pool}
        right = sum(answers_match(r["label"], gold[r["input_text"]], "number") for r in rows)
        print(f"teacher labeled {len(rows)}/{len(pool)} pool questions through vLLM ({stats.get('seconds', '?')}s); "
              f"its label is right on {right}/{len(rows)} = {right / max(1, len(rows)):.3f}", flush=True)
        if len(rows) < max(args.sizes):
            raise SystemExit(f"the teacher labeled only {len(rows)} pool questions, {max(args.sizes)} needed; lower --sizes")
        teacher_info.update({"model": f"{args.teacher_model} tuned on {len(labeled)} worked answers", "steps": args.teacher_steps,
                             "train_seconds": train_s, "test_accuracy": t_acc["accuracy"], "test_samples": t_acc["samples"][:3],
                             "pool_labeled": len(rows), "pool_asked": len(pool), "pool_label_accuracy": right / len(rows),
                             "label_seconds": stats.get("seconds"), "rejects": {k: stats[k] for k in REJECT_REASONS}})
    else:
        rows = oracle_rows(make_rows(max(args.sizes), seed=777, exclude=used))
        teacher_info.update({"model": ORACLE["model"], "test_accuracy": 1.0, "pool_label_accuracy": 1.0})
    # What a student gets by always answering the most common label it was taught: the chance level.
    common = Counter(r["label"] for r in rows).most_common(1)[0][0]
    majority = sum(answers_match(common, r["label"], "number") for r in test_rows) / len(test_rows)
    results = []
    for seed in args.seeds:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        for n in args.sizes:
            teacher_file = work / f"teacher_n{n}_s{seed}.jsonl"
            write_jsonl_atomic(teacher_file, [rows[i] for i in order[:n]])
            for variant, (rw, explain_target, _) in VARIANTS.items():
                out = work / f"n{n}_{variant}_s{seed}"
                cfg = load_job_dict(job(out, teacher_file, variant, args.steps, seed, 2 if args.ray else 1, args.model, args.lr))
                started = time.perf_counter()
                shutil.rmtree(out, ignore_errors=True)  # a fresh student: no checkpoint of an earlier run to resume
                run(cfg, in_process=not args.ray)
                model_dir = out / "model"
                acc = evaluate_answers(model_dir, test_rows, task_type="number", prompt_fn=lambda x: "predict: " + x,
                                       extract="answer", max_new_tokens=6, chat_template="never")
                row = {"n": n, "variant": variant, "rationale_weight": rw, "explain_target": explain_target, "seed": seed, "steps": args.steps, "accuracy": acc["accuracy"],
                       "correct": acc["correct"], "test_n": acc["n"], "seconds": round(time.perf_counter() - started, 1),
                       "samples": acc["samples"][:3]}
                if rw > 0 and explain_target == "rationale_and_label":  # the rationale on request, then its answer
                    exp = evaluate_answers(model_dir, test_rows, task_type="number", prompt_fn=lambda x: "explain: " + x,
                                           extract="rationale", max_new_tokens=40, chat_template="never")
                    row.update({"explain_accuracy": exp["accuracy"], "explain_samples": exp["samples"][:2]})
                results.append(row)
                explain = f", explain-then-answer {row['explain_accuracy']:.3f}" if "explain_accuracy" in row else ""
                print(f"N={n:4d} seed={seed} {variant}: accuracy {acc['correct']}/{acc['n']} = {acc['accuracy']:.3f}{explain} "
                      f"({row['seconds']}s)", flush=True)
    smallest = min(args.sizes)

    def mean_acc(n, variant, key="accuracy"):
        xs = [r[key] for r in results if r["n"] == n and r["variant"] == variant]
        return sum(xs) / len(xs)

    sbs, std = mean_acc(smallest, "step_by_step"), mean_acc(smallest, "standard")
    ratio = sbs / std if std > 0 else (float("inf") if sbs > 0 else None)
    accuracy = {str(n): {v: mean_acc(n, v) for v in VARIANTS} | {"step_by_step_explain_then_answer": mean_acc(n, "step_by_step", "explain_accuracy")}
                for n in args.sizes}
    columns = [*VARIANTS, "step_by_step_explain_then_answer"]
    print(f"\nteacher: {teacher_info['model']}; held-out accuracy {teacher_info['test_accuracy']:.3f}, "
          f"right on {teacher_info['pool_label_accuracy']:.3f} of the labels it gave the students")
    print(f"{'N':>6}" + "".join(f"{c:>34}" for c in columns))
    for n in args.sizes:
        print(f"{n:>6}" + "".join(f"{accuracy[str(n)][c]:>34.3f}" for c in columns))
    print(f"always answering the most common label ({common}): {majority:.3f}")
    print(f"ratio step_by_step / standard at N={smallest}: {ratio}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    student = f"{args.model} (random init)" if args.model.startswith("tiny") else args.model
    title = (f"chain_sum, 3 one-digit terms; student {student}; {args.steps} steps x 16; seeds {args.seeds}\n"
             f"teacher: {teacher_info['model']}")
    plot(results, args.sizes, RESULTS / "distill_quality.png", title, teacher_info["test_accuracy"], majority)
    summary = {
        "ratio": ratio, "target": 1.0,
        "metric": f"step-by-step student label accuracy / standard fine-tuning accuracy at N={smallest} (mean over seeds)",
        "task": "reasoning-gym chain_sum, 3 one-digit terms; 200 held-out questions",
        "teacher": teacher_info, "teacher_accuracy": teacher_info["test_accuracy"],
        "majority_accuracy": majority, "student": student, "title": title,
        "variants": {k: {"rationale_weight": v[0], "explain_target": v[1], "label": v[2]} for k, v in VARIANTS.items()},
        "sizes": args.sizes, "seeds": args.seeds, "steps": args.steps, "global_batch_size": 16, "learning_rate": args.lr,
        "runner": "rayapp.training.distill.recipe.run (2 Ray Train workers)" if args.ray else "rayapp.training.distill.recipe.run, in process",
        "accuracy": accuracy, "runs": results, "wall_time_s": round(time.perf_counter() - t0, 1), "plot": "distill_quality.png",
    }
    (RESULTS / "distill_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "".join(f"<tr><td>{n}</td>" + "".join(f"<td>{accuracy[str(n)][c]:.3f}</td>" for c in columns) + "</tr>" for n in args.sizes)
    (RESULTS / "distill_quality.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>distill quality</title><h1>Distilling step-by-step vs standard fine-tuning</h1>"
        f"<p>{summary['task']}; student {summary['student']}; teacher: {teacher_info['model']} (held-out accuracy "
        f"{teacher_info['test_accuracy']:.3f}, its labels right on {teacher_info['pool_label_accuracy']:.3f} of the pool); "
        f"{args.steps} steps of 16 examples for every run; seeds {args.seeds}; runner: {summary['runner']}.</p>"
        "<table border=1><tr><th>N</th>" + "".join(f"<th>{c}</th>" for c in columns) + f"</tr>{table}</table>"
        f"<p>ratio at N={smallest}: {ratio}</p><img src='distill_quality.png'>\n")
    print(f"wrote {RESULTS / 'distill_quality.json'} ({summary['wall_time_s']}s)")


if __name__ == "__main__":
    main()
