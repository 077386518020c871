"""Distilling step-by-step vs standard fine-tuning at equal data: label accuracy of the student.

Task: reasoning-gym ``chain_sum`` (3 one-digit terms, e.g. ``4 - 1 - 7 =``), answers checked
numerically (``rayapp.teachers.templates.answers_match``). Rationales: the step-by-step partial
sums of each expression ("4 - 1 = 3. 3 - 7 = -4. So the answer is -4."), written by this script
from reasoning-gym's expression; they stand in for a teacher that solves the task perfectly (no teacher model is
trained or sampled here, to keep the bench within minutes on 2 CPU cores; the teacher-output
file records this in ``teacher.model``). Labels are reasoning-gym's gold answers.

For each training size N and seed, two students start from the same tiny model (the locally
built 2-layer Llama, random weights) and train for the same number of optimizer steps on the same
N questions: ``rationale_weight: 0.5`` (step-by-step: predict + explain tasks) and
``rationale_weight: 0`` (standard fine-tuning on the labels). Accuracy: greedy "predict: " answers
on 200 held-out questions (the paper's inference mode); for the step-by-step student also
"explain: " then the answer after "So the answer is" (the rationale task asked for at inference).
Training goes through the recipe's own pieces (build_data, step_by_step_loss, the shared loop
``fit``) in one process; ``--ray`` runs the full recipe
(``rayapp.training.distill.run``, 2 Ray Train workers) instead.

Writes bench/results/distill_quality.json ({"ratio": step-by-step acc / standard acc at the
smallest N, "target": 1.0, ...}), bench/results/distill_quality.png and distill_quality.html.

    .venv/bin/python bench/distill_quality.py [--sizes 250 500 1000 2000] [--steps 1500] [--seeds 0 1]
        [--model tiny | tiny:layers=4,hidden=256 | DIR] [--ray]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TEACHER = {"model": "reasoning-gym:chain_sum (programmatic step-by-step partial sums)", "template": "none", "sampling": {}}


def partial_sums(expression: str) -> tuple[str, int]:
    """'4 - 1 - 7' -> ('4 - 1 = 3. 3 - 7 = -4. So the answer is -4.', -4)."""
    tokens = expression.split()
    acc = int(tokens[0])
    steps = []
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        new = acc + int(num) if op == "+" else acc - int(num)
        steps.append(f"{acc} {op} {num} = {new}.")
        acc = new
    return " ".join(steps) + f" So the answer is {acc}.", acc


def make_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    import reasoning_gym as rg

    ds = rg.create_dataset("chain_sum", size=4 * n + 200, seed=seed, min_terms=3, max_terms=3, min_digits=1, max_digits=1)
    rows, seen = [], set(exclude)
    for x in ds:
        expr = x["metadata"]["expression"]
        if expr in seen:
            continue
        seen.add(expr)
        rationale, value = partial_sums(expr)
        assert str(value) == str(x["answer"]), (expr, value, x["answer"])
        rows.append({"input_text": f"{expr} =", "label": str(x["answer"]), "rationale": rationale, "teacher": TEACHER})
        if len(rows) == n:
            break
    return rows


def job(out: Path, teacher_file: Path, rationale_weight: float, steps: int, seed: int, num_workers: int, model: str, lr: float) -> dict:
    return {
        "kind": "distill", "name": out.name, "method": "step_by_step", "task_type": "number",
        "model": {"path": model, "max_seq_len": 64},
        "teacher": {"outputs": str(teacher_file)},
        "data": {"train": str(teacher_file), "chat_template": "never"},  # plain "predict: 4 - 1 - 7 =" + answer: short sequences
        "step_by_step": {"rationale_weight": rationale_weight},
        "train": {"max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16 // num_workers, "learning_rate": lr,
                  "warmup_ratio": 0.05, "eval_every": 10_000, "checkpoint_every": 10_000, "log_every": 10, "seed": seed},
        "resources": {"num_workers": num_workers},
        "evaluation": {"max_examples": 200, "max_new_tokens": 6},
        "output_dir": str(out),
    }


def train_in_process(cfg) -> Path:
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model, save_model_atomic
    from rayapp.training import distill_losses as L
    from rayapp.training.distill_data import build_data
    from rayapp.training.loop import LocalReporter, fit

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(cfg.model.path)
    tok = load_tokenizer(model_dir)
    data = build_data(cfg, tok, out)
    torch.manual_seed(cfg.train.seed)
    model = load_causal_lm(model_dir)
    fit(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.train.peak_lr), train_items=data.train, val_items=None,
        collate=lambda it: L.collate_distill(it, tok.pad_token_id), count_fn=L.count_supervised,
        loss_fn=L.step_by_step_loss(1 - cfg.step_by_step.rationale_weight, data.p_label, data.p_rationale),
        cfg=cfg.train, micro_batch_size=cfg.train.micro_batch_size, reporter=LocalReporter(), metrics_path=out / "metrics.jsonl", name=cfg.name)
    return save_model_atomic(model, tok, out / "model")


def plot(results: list[dict], sizes: list[int], path: Path, title: str) -> None:
    """Mean accuracy per size (lines) and every seed's run (faint points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    series = ((0.5, "accuracy", "C0", "o", "-", "step-by-step, predict (rationale_weight 0.5)"),
              (0.0, "accuracy", "C1", "o", "-", "standard fine-tuning (rationale_weight 0)"),
              (0.5, "explain_accuracy", "C0", "s", "--", "step-by-step, explain then answer"))
    for rw, key, color, marker, style, name in series:
        runs = [r for r in results if r["rationale_weight"] == rw and key in r]
        means = [sum(r[key] for r in runs if r["n"] == n) / max(1, sum(1 for r in runs if r["n"] == n)) for n in sizes]
        ax.plot(sizes, means, marker=marker, linestyle=style, color=color, alpha=1.0 if style == "-" else 0.6, label=name)
        ax.scatter([r["n"] for r in runs], [r[key] for r in runs], color=color, marker=marker, s=12, alpha=0.3)
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


def _title(student: str, steps: int, seeds: list[int]) -> str:
    return f"chain_sum, 3 one-digit terms; student {student}; {steps} steps x 16; seeds {seeds}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--model", default="tiny", help="student start: 'tiny', 'tiny:layers=4,hidden=256', or a directory")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ray", action="store_true", help="run the full recipe on 2 Ray Train workers")
    ap.add_argument("--work", default="outputs/bench_distill_quality")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from bench/results/distill_quality.json, no training")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "distill_quality.json").read_text())
        plot(saved["runs"], saved["sizes"], RESULTS / "distill_quality.png", _title(saved["student"], saved["steps"], saved["seeds"]))
        print(f"wrote {RESULTS / 'distill_quality.png'}")
        return
    import torch

    torch.set_num_threads(args.threads)

    from rayapp.config.loader import load_job_dict
    from rayapp.evaluation import evaluate_answers

    t0 = time.perf_counter()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    test = make_rows(200, seed=12345)
    pool = make_rows(max(args.sizes), seed=777, exclude={r["input_text"] for r in test})
    results = []
    for seed in args.seeds:
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        for n in args.sizes:
            teacher_file = work / f"teacher_n{n}_s{seed}.jsonl"
            teacher_file.write_text("".join(json.dumps(pool[i]) + "\n" for i in order[:n]))
            for rw in (0.5, 0.0):
                out = work / f"n{n}_rw{rw}_s{seed}"
                cfg = load_job_dict(job(out, teacher_file, rw, args.steps, seed, 2 if args.ray else 1, args.model, args.lr))
                started = time.perf_counter()
                if args.ray:
                    from rayapp.training.distill import run

                    run(cfg)
                    model_dir = out / "model"
                else:
                    model_dir = train_in_process(cfg)
                acc = evaluate_answers(model_dir, test, task_type="number", prompt_fn=lambda x: "predict: " + x,
                                       extract="answer", max_new_tokens=6, chat_template="never")
                row = {"n": n, "rationale_weight": rw, "seed": seed, "steps": args.steps, "accuracy": acc["accuracy"],
                       "correct": acc["correct"], "test_n": acc["n"], "seconds": round(time.perf_counter() - started, 1),
                       "samples": acc["samples"][:3]}
                if rw > 0:  # the rationale task on request: "explain: ..." then the answer after "So the answer is"
                    exp = evaluate_answers(model_dir, test, task_type="number", prompt_fn=lambda x: "explain: " + x,
                                           extract="rationale", max_new_tokens=40, chat_template="never")
                    row.update({"explain_accuracy": exp["accuracy"], "explain_samples": exp["samples"][:2]})
                results.append(row)
                explain = f", explain-then-answer {row['explain_accuracy']:.3f}" if rw > 0 else ""
                print(f"N={n:4d} seed={seed} rationale_weight={rw}: accuracy {acc['correct']}/{acc['n']} = {acc['accuracy']:.3f}{explain} "
                      f"({row['seconds']}s)", flush=True)
    smallest = min(args.sizes)

    def mean_acc(n, rw, key="accuracy"):
        xs = [r[key] for r in results if r["n"] == n and r["rationale_weight"] == rw]
        return sum(xs) / len(xs)

    sbs, std = mean_acc(smallest, 0.5), mean_acc(smallest, 0.0)
    ratio = sbs / std if std > 0 else (float("inf") if sbs > 0 else None)
    print(f"\n{'N':>6} {'step-by-step':>13} {'standard':>9} {'sbs explain->answer':>20}")
    for n in args.sizes:
        print(f"{n:>6} {mean_acc(n, 0.5):>13.3f} {mean_acc(n, 0.0):>9.3f} {mean_acc(n, 0.5, 'explain_accuracy'):>20.3f}")
    print(f"ratio at N={smallest}: {ratio}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    student = f"{args.model} (random init)" if args.model.startswith("tiny") else args.model
    plot(results, args.sizes, RESULTS / "distill_quality.png", _title(student, args.steps, args.seeds))
    summary = {
        "ratio": ratio, "target": 1.0,
        "metric": f"step-by-step student label accuracy / standard fine-tuning accuracy at N={smallest}",
        "task": "reasoning-gym chain_sum, 3 one-digit terms; 200 held-out questions",
        "teacher": TEACHER["model"], "student": student,
        "sizes": args.sizes, "seeds": args.seeds, "steps": args.steps, "global_batch_size": 16, "learning_rate": args.lr,
        "runner": "rayapp.training.distill.run (2 Ray Train workers)" if args.ray else "in-process: build_data + step_by_step_loss + loop.fit",
        "accuracy": {str(n): {"step_by_step": mean_acc(n, 0.5), "standard": mean_acc(n, 0.0),
                              "step_by_step_explain_then_answer": mean_acc(n, 0.5, "explain_accuracy")} for n in args.sizes},
        "runs": results, "wall_time_s": round(time.perf_counter() - t0, 1), "plot": "distill_quality.png",
    }
    (RESULTS / "distill_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "".join(f"<tr><td>{n}</td><td>{mean_acc(n, 0.5):.3f}</td><td>{mean_acc(n, 0.0):.3f}</td></tr>" for n in args.sizes)
    (RESULTS / "distill_quality.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>distill quality</title><h1>Distilling step-by-step vs standard fine-tuning</h1>"
        f"<p>{summary['task']}; student {summary['student']}; teacher rationales: {summary['teacher']}; "
        f"{args.steps} steps of 16 examples for every run; seeds {args.seeds}; runner: {summary['runner']}.</p>"
        f"<table border=1><tr><th>N</th><th>step-by-step</th><th>standard</th></tr>{table}</table>"
        f"<p>ratio at N={smallest}: {ratio}</p><img src='distill_quality.png'>\n")
    print(f"wrote {RESULTS / 'distill_quality.json'} ({summary['wall_time_s']}s)")


if __name__ == "__main__":
    main()
