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

For each training size N and seed, students train on the same N teacher-labeled questions, every
one by the distill recipe itself (``rayapp.training.distill.recipe.run``), its workers in this
process (``in_process=True``: one worker, no Ray; ``--ray`` runs them on 2 Ray Train workers).
Two kinds of student (STUDENTS, ``--students``), each in its variants (VARIANTS):

- ``demo``, the demo's students (jobs/demo.yaml ``student_sbs`` / ``student_std``): the teacher's
  layers 0, 1 and 3 (``student.init: from_teacher_layers``, ``layers: [0, 1, 3]``), 32 questions
  a step (step-by-step: 64 examples, each question asked both tasks), learning rate 1e-3, 16 passes
  over the N questions unless ``--steps`` (125 steps at N = 250 ... 1000 at N = 2000, the demo's
  own steps at about its size); step-by-step with ``rationale_weight: 0.2`` against standard
  fine-tuning (``rationale_weight: 0``). The headline ``ratio`` is about this student.
- ``demo_fixed_steps``: the same students at 1000 steps whatever N (the earlier protocol: 128 passes
  over 250 questions, where both students over-train and fall to ~0.1).
- ``teacher_layers``, the demo's students before they kept layer 1 too: the teacher's layers 0
  and 3 (``keep_every: 3``), otherwise the same recipe.
- ``scratch``: the locally built 2-layer Llama with random weights (``--model``), 16 examples a
  step, learning rate 3e-3, 1500 steps: step-by-step as rayapp runs it by default
  (``rationale_weight: 0.5``, the explain target ending "So the answer is <label>."), step-by-step
  as the paper's reference code (``explain_target: rationale``, the rationale alone) and standard
  fine-tuning.

Accuracy: greedy "predict: " answers on the held-out questions (the paper's inference mode); for
the step-by-step student also "explain: " then the answer after "So the answer is" (the rationale
task asked for at inference). Each accuracy is also given as a fraction of the teacher's.
``--merge`` keeps the saved runs this invocation does not redo (a run made before students had
names is a ``scratch`` one), each labelled with the commit it came from, so sizes and seeds can be
added run by run; results are written after every student.

Writes bench/results/distill_quality.json ({"ratio": step-by-step acc / standard acc at the
smallest N for the demo student, "target": 1.2, ...}), bench/results/distill_quality.png
and distill_quality.html.

    .venv/bin/python bench/distill_quality.py [--sizes 250 500 1000 2000] [--seeds 0 1 2]
        [--students scratch teacher_layers demo demo_fixed_steps] [--steps 200] [--merge] [--teacher model|oracle]
        [--teacher-model tiny:layers=4,hidden=256] [--teacher-steps 2000] [--model tiny | DIR] [--ray]
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


# name -> (explain_target, label in the table and plot); each student's rationale weights are in STUDENTS
VARIANTS = {
    "step_by_step": ("rationale_and_label", "step-by-step (explain: rationale + answer)"),
    "step_by_step_paper": ("rationale", "step-by-step, paper (explain: rationale)"),
    "standard": ("rationale", "standard fine-tuning (rationale_weight 0)"),
}
EXPLAIN = "step_by_step_explain_then_answer"  # the step-by-step student asked "explain: ", scored on its answer


@dataclasses.dataclass(frozen=True)
class Student:
    """Where a student starts and the recipe settings every one of its variants trains with."""

    label: str
    student: dict  # the distill job's ``student:`` section
    variants: dict  # variant -> rationale_weight
    questions_per_step: int
    both_tasks: bool  # step-by-step steps hold each question twice (predict + explain), as the paper batches them
    learning_rate: float
    default_steps: int  # optimizer steps unless --steps or epochs says otherwise
    max_seq_len: int
    # passes over the N questions: steps = epochs * N / questions_per_step, so every N is trained alike
    # (None: default_steps at every N, whatever N is)
    epochs: float | None = None

    def steps(self, n: int) -> int:
        return max(1, round(self.epochs * n / self.questions_per_step)) if self.epochs else self.default_steps


STUDENTS = {
    # the earlier protocol: a 2-layer tiny model with random weights (--model), 16 examples a step for every variant
    "scratch": Student("2-layer tiny, random init", {"init": "from_model"},
                       {"step_by_step": 0.5, "step_by_step_paper": 0.5, "standard": 0.0}, 16, False, 3e-3, 1500, 64),
    # the demo's students until the demo moved to layers 0, 1 and 3
    "teacher_layers": Student("teacher's layers 0 and 3 (from_teacher_layers, keep_every 3)",
                              {"init": "from_teacher_layers", "keep_every": 3},
                              {"step_by_step": 0.2, "standard": 0.0}, 32, True, 1e-3, 1000, 96),
    # jobs/demo.yaml student_sbs / student_std, 16 passes over the data at every N: 1000 steps at N = 2000, the
    # demo's own steps and size (its ~1700 kept rows get ~19 passes)
    "demo": Student("the demo's students (teacher's layers 0, 1, 3), 16 passes",
                    {"init": "from_teacher_layers", "layers": [0, 1, 3]},
                    {"step_by_step": 0.2, "standard": 0.0}, 32, True, 1e-3, 1000, 96, epochs=16),
}
# the same students at the demo's 1000 steps at every N (the earlier protocol: 128 passes at N = 250)
STUDENTS["demo_fixed_steps"] = dataclasses.replace(STUDENTS["demo"], label="the demo's students (layers 0, 1, 3), 1000 steps at any N",
                                                   epochs=None)
HEADLINE = "demo"  # the headline ratio is about the student the demo uses


def batch_size(student: str, variant: str) -> int:
    st = STUDENTS[student]
    return st.questions_per_step * (2 if st.both_tasks and st.variants[variant] > 0 else 1)


def job(out: Path, teacher_file: Path, teacher_dir: Path | None, student: str, variant: str, steps: int, seed: int,
        num_workers: int, model: str) -> dict:
    st = STUDENTS[student]
    batch = batch_size(student, variant)
    teacher = {"outputs": str(teacher_file)}
    if st.student["init"] == "from_teacher_layers":
        teacher["path"] = str(teacher_dir)
    return {
        "kind": "distill", "name": out.name, "method": "step_by_step", "task_type": "number",
        "model": {"path": model, "max_seq_len": st.max_seq_len},
        "student": st.student,
        "teacher": teacher,
        "data": {"train": str(teacher_file), "chat_template": "never"},  # plain "predict: 4 - 1 - 7 =" + answer: short sequences
        "step_by_step": {"rationale_weight": st.variants[variant], "explain_target": VARIANTS[variant][0]},
        "train": {"max_steps": steps, "global_batch_size": batch, "micro_batch_size": batch // num_workers,
                  "learning_rate": st.learning_rate, "warmup_ratio": 0.05, "eval_every": 10_000, "checkpoint_every": 10_000,
                  "log_every": 10, "seed": seed},
        "resources": {"num_workers": num_workers},
        "evaluation": {"max_examples": 200, "max_new_tokens": 6},
        "output_dir": str(out),
    }


def columns(student: str) -> list[str]:
    return [*STUDENTS[student].variants, EXPLAIN]


def cell(runs: list[dict]) -> dict | None:
    """Mean, sample standard deviation, range over seeds and the mean as a fraction of the teacher's accuracy."""
    if not runs:
        return None
    xs = [r["accuracy"] for r in runs]
    mean = sum(xs) / len(xs)
    sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    teacher = sum(r["teacher_accuracy"] for r in runs) / len(runs)
    return {"mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "seeds": sorted(r["seed"] for r in runs),
            "fraction_of_teacher": mean / teacher if teacher else None}


def score_rows(results: list[dict], student: str, n: int, column: str) -> list[dict]:
    """The runs behind one table cell, as {seed, accuracy, teacher_accuracy}."""
    if column == EXPLAIN:
        return [r | {"accuracy": r["explain_accuracy"]} for r in results
                if r["student"] == student and r["n"] == n and r["variant"] == "step_by_step" and "explain_accuracy" in r]
    return [r for r in results if r["student"] == student and r["n"] == n and r["variant"] == column]


def table(results: list[dict]) -> dict:
    """student -> N -> column -> cell()."""
    out = {}
    for student in STUDENTS:
        sizes = sorted({r["n"] for r in results if r["student"] == student})
        if sizes:
            out[student] = {str(n): {c: cell(score_rows(results, student, n, c)) for c in columns(student)} for n in sizes}
    return out


def ratios(cells: dict) -> dict:
    """student -> N -> step-by-step mean accuracy / standard mean accuracy."""
    out = {}
    for student, by_n in cells.items():
        out[student] = {}
        for n, c in by_n.items():
            sbs, std = c.get("step_by_step"), c.get("standard")
            if sbs and std:
                out[student][n] = sbs["mean"] / std["mean"] if std["mean"] > 0 else (float("inf") if sbs["mean"] > 0 else None)
    return out


def student_note(results: list[dict], student: str) -> str:
    runs = [r for r in results if r["student"] == student]
    steps = sorted({r["steps"] for r in runs})
    batches = sorted({r.get("global_batch_size", 16) for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    kept = " (earlier run, kept)" if any("source" in r for r in runs) else ""
    st = STUDENTS[student]
    if any(r["steps"] != st.steps(r["n"]) for r in runs):
        kept += f" (its recipe's default: {f'{st.epochs:g} passes over the N questions' if st.epochs else f'{st.default_steps} steps'})"
    return f"{'/'.join(map(str, steps))} steps x {'/'.join(map(str, batches))} examples, seeds {seeds}{kept}"


def plot(results: list[dict], path: Path, title: str, teacher_accuracy: float | None = None,
         majority_accuracy: float | None = None) -> None:
    """One panel per student: mean accuracy per size (lines, bars: one sd over seeds), every seed's run
    (faint points), the teacher's accuracy and the always-the-most-common-answer baseline (grey lines);
    the right axis reads accuracy as a fraction of the teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = table(results)
    students = list(cells)
    style = {"step_by_step": ("C0", "o", "-"), "step_by_step_paper": ("C2", "o", "-"), "standard": ("C1", "o", "-"),
             EXPLAIN: ("C0", "s", "--")}
    names = {"step_by_step": "step-by-step, predict (explain: rationale + answer)", "step_by_step_paper":
             "step-by-step, paper, predict (explain: rationale)", "standard": "standard fine-tuning (rationale_weight 0)",
             EXPLAIN: "step-by-step, explain then answer"}
    top = max([teacher_accuracy or 0] + [r.get("teacher_accuracy") or 0 for r in results] + [r["accuracy"] for r in results] + [r.get("explain_accuracy", 0) for r in results])
    fig, axes = plt.subplots(1, len(students), figsize=(5.8 * len(students), 6.0), dpi=110, sharey=True, squeeze=False)
    for ax, student in zip(axes[0], students, strict=True):
        sizes = [int(n) for n in cells[student]]
        for column in columns(student):
            color, marker, line = style[column]
            pts = [(n, cells[student][str(n)][column]) for n in sizes if cells[student][str(n)][column]]
            if not pts:
                continue
            label = names[column] + (f", rationale_weight {STUDENTS[student].variants[column]}"
                                     if column in ("step_by_step", "step_by_step_paper") else "")
            ax.errorbar([n for n, _ in pts], [c["mean"] for _, c in pts], yerr=[c["sd"] for _, c in pts], marker=marker,
                        linestyle=line, color=color, alpha=1.0 if line == "-" else 0.6, capsize=3, label=label)
            seeds = [r for n in sizes for r in score_rows(results, student, n, column)]
            ax.scatter([r["n"] for r in seeds], [r["accuracy"] for r in seeds], color=color, marker=marker, s=12, alpha=0.3)
        # the teacher these students learned from (a kept earlier run may have had another instance of it)
        taught = [r["teacher_accuracy"] for r in results if r["student"] == student and r.get("teacher_accuracy")]
        t_acc = sum(taught) / len(taught) if taught else teacher_accuracy
        if t_acc:
            ax.axhline(t_acc, color="grey", linestyle=":", label=f"their teacher ({t_acc:.3f})")
            ax.secondary_yaxis("right", functions=(lambda a, t=t_acc: a / t, lambda f, t=t_acc: f * t)
                               ).set_ylabel("fraction of their teacher's accuracy", fontsize=8)
        if majority_accuracy is not None:
            ax.axhline(majority_accuracy, color="grey", linestyle="-.", label=f"most common answer ({majority_accuracy:.3f})")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_ylim(0, min(1.0, top + 0.08))
        ax.set_xlabel("teacher-labeled training questions (N)")
        ax.set_title(f"student: {STUDENTS[student].label}\n{student_note(results, student)}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0][0].set_ylabel("label accuracy (200 held-out, greedy)")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.92, top=0.86, bottom=0.34, wspace=0.32)  # legends under the panels
    fig.savefig(path)
    plt.close(fig)


def saved_commit() -> str:
    """The commit that last wrote the saved results file (provenance of the runs a --merge keeps)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", "bench/results/distill_quality.json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown commit"


def kept_runs(saved: dict, redo: set) -> list[dict]:
    """The saved runs this invocation does not redo, each labelled with where it came from (runs written before
    students had names are the from-scratch ones, scored against the teacher of that file)."""
    commit = saved_commit()
    out = []
    for r in saved.get("runs", []):
        r = {"student": "scratch", "teacher_accuracy": saved.get("teacher_accuracy"), "global_batch_size": 16} | r
        if (r["student"], r["n"], r["seed"], r["variant"]) in redo:
            continue
        if "source" not in r:
            r["source"] = (f"an earlier invocation of this bench ({r['run_at'][:10]}, runner: {r.get('runner')})" if "run_at" in r
                           else f"bench/results/distill_quality.json of commit {commit}, runner: {saved.get('runner')}")
        out.append(r)
    return out


def write_results(summary: dict, results: list[dict]) -> None:
    """JSON, plot and HTML from every run so far (called after each student, so a cut-short run keeps its results)."""
    cells, rat = table(results), ratios(table(results))
    head = cells.get(HEADLINE, {})
    smallest = min((int(n) for n in head), default=None)
    ratio = rat.get(HEADLINE, {}).get(str(smallest)) if smallest else None
    summary |= {
        "ratio": ratio, "target": 1.2,
        "metric": f"step-by-step / standard fine-tuning label accuracy at the smallest N ({smallest}) for the student the "
                  f"demo uses ({HEADLINE}: {STUDENTS[HEADLINE].label}), mean over seeds",
        "headline_student": HEADLINE,
        "students": {s: dataclasses.asdict(STUDENTS[s]) | {"note": student_note(results, s),
                                                             "sources": sorted({r.get("source", "this run") for r in results
                                                                                if r["student"] == s})}
                     for s in cells},
        "variants": {k: {"explain_target": v[0], "label": v[1]} for k, v in VARIANTS.items()},
        "sizes": sorted({r["n"] for r in results}), "seeds": sorted({r["seed"] for r in results}),
        "accuracy": {s: {n: {c: x and x["mean"] for c, x in by_n.items()} for n, by_n in cells[s].items()} for s in cells},
        "fraction_of_teacher": {s: {n: {c: x and x["fraction_of_teacher"] for c, x in by_n.items()} for n, by_n in cells[s].items()}
                                for s in cells},
        "cells": cells, "ratios": rat, "runs": results,
    }
    (RESULTS / "distill_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, RESULTS / "distill_quality.png", summary["title"], summary["teacher_accuracy"], summary["majority_accuracy"])
    fmt = lambda x: f"{x['mean']:.3f} ± {x['sd']:.3f} ({x['fraction_of_teacher']:.2f} of teacher)" if x else "-"  # noqa: E731
    rows = "".join(f"<tr><td>{s}</td><td>{n}</td>" + "".join(f"<td>{fmt(by_n.get(c))}</td>" for c in [*VARIANTS, EXPLAIN])
                   + f"<td>{rat[s].get(n, '-')}</td></tr>" for s in cells for n, by_n in cells[s].items())
    (RESULTS / "distill_quality.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>distill quality</title><h1>Distilling step-by-step vs standard fine-tuning</h1>"
        f"<p>{summary['task']}; teacher: {summary['teacher']['model']} (held-out accuracy {summary['teacher_accuracy']:.3f}); "
        + "; ".join(f"student {s}: {STUDENTS[s].label}, {student_note(results, s)}" for s in cells)
        + f"; runner: {summary['runner']}. Cells: mean ± sd over seeds (fraction of the teacher's accuracy).</p>"
        "<table border=1><tr><th>student</th><th>N</th>" + "".join(f"<th>{c}</th>" for c in [*VARIANTS, EXPLAIN])
        + f"<th>ratio</th></tr>{rows}</table><p>ratio ({HEADLINE}, N={smallest}): {ratio} (target 1.2)</p>"
        "<img src='distill_quality.png'>\n")


def print_table(summary: dict) -> None:
    print(f"\nteacher: {summary['teacher']['model']}; held-out accuracy {summary['teacher_accuracy']:.3f}"
          + (f", right on {summary['teacher']['pool_label_accuracy']:.3f} of the labels it gave the students"
             if "pool_label_accuracy" in summary["teacher"] else ""))
    for s, by_n in summary["cells"].items():
        print(f"\nstudent {s}: {STUDENTS[s].label}; {summary['students'][s]['note']}")
        print(f"{'N':>6}" + "".join(f"{c:>36}" for c in columns(s)) + f"{'ratio':>8}")
        for n, c in by_n.items():
            txt = [f"{x['mean']:.3f}±{x['sd']:.3f} ({x['fraction_of_teacher']:.2f}T)" if x else "-" for x in c.values()]
            r = summary["ratios"][s].get(n)
            print(f"{n:>6}" + "".join(f"{t:>36}" for t in txt) + (f"{r:>8.2f}" if r is not None else f"{'-':>8}"))
    print(f"\nalways answering the most common label: {summary['majority_accuracy']:.3f}; ±: sd over seeds; T: the teacher's accuracy")
    print(f"ratio step_by_step / standard, {summary['headline_student']} student, smallest N: {summary['ratio']} (target 1.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS),
                    help="scratch: 2-layer tiny from random weights; teacher_layers: the teacher's layers 0 and 3, the demo's earlier students; "
                         "demo: the teacher's layers 0, 1 and 3, the demo's students, 16 passes over the data; "
                         "demo_fixed_steps: the same at 1000 steps whatever N")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every student (default: each student's own, "
                    + ", ".join(f"{k} {f'{v.epochs:g} passes over the data' if v.epochs else v.default_steps}"
                              for k, v in STUDENTS.items()) + ")")
    ap.add_argument("--model", default="tiny", help="the scratch student's start: 'tiny', 'tiny:layers=4,hidden=256', or a directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher", choices=["model", "oracle"], default="model",
                    help="'model': a tuned teacher model labels the pool through vLLM; 'oracle': programmatic partial sums")
    ap.add_argument("--teacher-model", default="tiny:layers=4,hidden=256", help="the teacher before tuning")
    ap.add_argument("--teacher-train", type=int, default=1000, help="labeled questions the teacher is tuned on")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=2000, help="pool questions the teacher labels (at least max --sizes; "
                    "fixed so the labels cached in --work serve every run)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the saved runs this invocation does not redo (same teacher), labelled with their commit")
    ap.add_argument("--ray", action="store_true", help="run the full recipe on 2 Ray Train workers")
    ap.add_argument("--work", default="outputs/bench_distill_quality")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--replot", action="store_true", help="redo the summary, plot and HTML from the runs in bench/results/distill_quality.json, no training")
    args = ap.parse_args()
    if args.replot:  # the summary, table, plot and HTML recomputed from the saved runs
        saved = json.loads((RESULTS / "distill_quality.json").read_text())
        write_results(saved, saved["runs"])
        print_table(saved)
        return
    from_teacher = [s for s in args.students if STUDENTS[s].student["init"] == "from_teacher_layers"]
    if args.teacher == "oracle" and from_teacher:
        raise SystemExit(f"--teacher oracle has no teacher model to build the {', '.join(from_teacher)} student(s) from; "
                         "pass --students scratch or --teacher model")
    if max(args.sizes) > args.pool:
        raise SystemExit(f"--sizes up to {max(args.sizes)} need --pool >= {max(args.sizes)} (found {args.pool})")
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
    teacher_dir = None
    if args.teacher == "model":
        labeled = make_rows(args.teacher_train, seed=4242, exclude=used)
        used |= {r["input_text"] for r in labeled}
        # 10% spare: the teacher may leave a few questions without a parsable answer.
        pool = make_rows(args.pool * 11 // 10, seed=777, exclude=used)
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
        rows = oracle_rows(make_rows(args.pool, seed=777, exclude=used))
        teacher_info.update({"model": ORACLE["model"], "test_accuracy": 1.0, "pool_label_accuracy": 1.0})
    # What a student gets by always answering the most common label it was taught: the chance level.
    common = Counter(r["label"] for r in rows).most_common(1)[0][0]
    majority = sum(answers_match(common, r["label"], "number") for r in test_rows) / len(test_rows)
    runner = "rayapp.training.distill.recipe.run (2 Ray Train workers)" if args.ray else "rayapp.training.distill.recipe.run, in process"
    redo = {(s, n, seed, v) for s in args.students for n in args.sizes for seed in args.seeds for v in STUDENTS[s].variants}
    results = []
    if args.merge and (RESULTS / "distill_quality.json").exists():
        saved = json.loads((RESULTS / "distill_quality.json").read_text())
        results = kept_runs(saved, redo)
        for r in results:  # a student's cells come from one teacher; other students keep the teacher they had
            if r["student"] in args.students and r.get("teacher_accuracy") != teacher_info["test_accuracy"]:
                raise SystemExit(f"--merge: saved run {r['student']} N={r['n']} seed {r['seed']} came from a teacher with held-out "
                                 f"accuracy {r.get('teacher_accuracy')}, this one has {teacher_info['test_accuracy']}; "
                                 "run without --merge or with the same teacher settings")
        print(f"--merge: keeping {len(results)} saved runs", flush=True)
    summary = {
        "task": "reasoning-gym chain_sum, 3 one-digit terms; 200 held-out questions",
        "teacher": teacher_info, "teacher_accuracy": teacher_info["test_accuracy"], "majority_accuracy": majority,
        "title": f"chain_sum, 3 one-digit terms; teacher: {teacher_info['model']} (held-out {teacher_info['test_accuracy']:.3f})",
        "runner": runner, "bench_seconds_this_invocation": None, "plot": "distill_quality.png",
    }
    for seed in args.seeds:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        for n in args.sizes:
            teacher_file = work / f"teacher_n{n}_s{seed}.jsonl"
            write_jsonl_atomic(teacher_file, [rows[i] for i in order[:n]])
            for student in args.students:
                steps = args.steps or STUDENTS[student].steps(n)
                for variant, rw in STUDENTS[student].variants.items():
                    out = work / f"n{n}_{student}_{variant}_s{seed}"
                    cfg = load_job_dict(job(out, teacher_file, teacher_dir, student, variant, steps, seed, 2 if args.ray else 1,
                                            args.model))
                    started = time.perf_counter()
                    shutil.rmtree(out, ignore_errors=True)  # a fresh student: no checkpoint of an earlier run to resume
                    run(cfg, in_process=not args.ray)
                    train_s = round(time.perf_counter() - started, 1)
                    model_dir = out / "model"
                    acc = evaluate_answers(model_dir, test_rows, task_type="number", prompt_fn=lambda x: "predict: " + x,
                                           extract="answer", max_new_tokens=6, chat_template="never")
                    row = {"student": student, "n": n, "variant": variant, "rationale_weight": rw,
                           "explain_target": VARIANTS[variant][0], "seed": seed, "steps": steps,
                           "global_batch_size": batch_size(student, variant), "learning_rate": STUDENTS[student].learning_rate,
                           "accuracy": acc["accuracy"], "correct": acc["correct"], "test_n": acc["n"],
                           "teacher_accuracy": teacher_info["test_accuracy"], "train_seconds": train_s,
                           "samples": acc["samples"][:3], "run_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runner": runner}
                    if rw > 0 and VARIANTS[variant][0] == "rationale_and_label":  # the rationale on request, then its answer
                        exp = evaluate_answers(model_dir, test_rows, task_type="number", prompt_fn=lambda x: "explain: " + x,
                                               extract="rationale", max_new_tokens=40, chat_template="never")
                        row.update({"explain_accuracy": exp["accuracy"], "explain_samples": exp["samples"][:2]})
                    row["seconds"] = round(time.perf_counter() - started, 1)
                    results = [r for r in results if (r["student"], r["n"], r["seed"], r["variant"]) != (student, n, seed, variant)]
                    results.append(row)
                    explain = f", explain-then-answer {row['explain_accuracy']:.3f}" if "explain_accuracy" in row else ""
                    print(f"N={n:4d} seed={seed} {student} {variant}: accuracy {acc['correct']}/{acc['n']} = {acc['accuracy']:.3f}"
                          f"{explain} ({train_s}s training, {row['seconds']}s in all)", flush=True)
                    summary["bench_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
                    write_results(summary, results)
    print_table(summary)
    print(f"wrote {RESULTS / 'distill_quality.json'} ({summary['bench_seconds_this_invocation']}s this invocation)")


if __name__ == "__main__":
    main()
