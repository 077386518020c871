"""On-policy distillation vs SFT on teacher-written answers: held-out accuracy against the student's
training tokens.

Task: reasoning-gym ``chain_sum`` (2-3 one-digit terms, as jobs/demo.yaml), answers checked
numerically. One teacher: ``--teacher-model`` (the locally built 4-layer Llama) tuned in this
process on worked answers ("4 - 1 = 3. 3 - 7 = -4. So the answer is -4."). One student start:
the teacher's layers 0 and 3 (``student.init: from_teacher_layers``, keep_every 3, as the demo's
students), warm-started by ``--warmup-sft-steps`` SFT steps on the teacher's answers (not counted
in either arm; Thinking Machines compare from a mid-trained student too). One prompt set (``--prompts`` questions, disjoint from the teacher's and the 200
held-out ones). Then, from the same student start:

(a) SFT on teacher-written answers: the teacher's vLLM pool answers every prompt greedily (right or
    wrong), and the student is tuned on those answers (chat template, loss on the answer tokens) in
    this process, one thread, constant learning rate; held-out accuracy every ``--sft-eval-every``
    steps. Tokens = supervised answer tokens seen.
(b) on-policy distillation: ``kind: distill``, ``method: on_policy`` run by the recipe itself
    (``rayapp.training.distill.recipe.run``, its one train worker in this process, the student's and
    the teacher's vLLM engines as Ray actors), constant learning rate; held-out accuracy from the
    student's engine (``val_answer_accuracy``) every ``--opd-eval-every`` iterations. Tokens = sampled
    completion tokens trained on (``tokens_trained``).

Accuracy in both: greedy answers to the same held-out questions (chat template, 40 new tokens),
the answer after "So the answer is" when there is one, compared numerically. (a) generates with
transformers, (b) with the student's vLLM engine (float32 both); the recipe's own final
transformers evaluation of (b) is printed beside its last engine number as a check.

``ratio`` = training tokens SFT needs / tokens on-policy distillation needs to first reach the best
accuracy both attain (target 2.0). Writes bench/results/opd_vs_sft.json and opd_vs_sft.png.

    .venv/bin/python bench/opd_vs_sft.py [--prompts 1000] [--warmup-sft-steps 100] [--sft-steps 450] [--opd-iterations 45]
        [--sft-lr 2e-4] [--opd-lr 2e-4] [--opd-top-k 20] [--reuse-sft] [--replot]

The cold-start result in bench/results/opd_vs_sft_cold.json came from ``--warmup-sft-steps 0
--sft-steps 600 --sft-lr 1e-3 --opd-lr 1e-3 --opd-iterations 60``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def chain_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct chain_sum questions (2-3 one-digit terms) not in ``exclude``: {input_text, gold, rationale}."""
    import reasoning_gym as rg

    from rayapp.data.dataset import chain_rationale

    ds = rg.create_dataset("chain_sum", size=8 * n + 400, seed=seed, min_terms=2, max_terms=3, min_digits=1, max_digits=1)
    rows, seen = [], set(exclude)
    for x in ds:
        q = f"{x['metadata']['expression']} ="
        if q in seen:
            continue
        seen.add(q)
        rows.append({"input_text": q, "gold": str(x["answer"]), "rationale": chain_rationale(x["metadata"]["expression"])})
        if len(rows) == n:
            return rows
    raise SystemExit(f"chain_sum gave only {len(rows)} new questions of the {n} asked (seed {seed})")


def greedy_accuracy(model, tok, rows: list[dict], max_new_tokens: int = 40) -> float:
    """Greedy answers of an in-memory model (chat template, left padding), scored as the recipe scores them."""
    import torch

    from rayapp.evaluation import render_prompts, score_answers

    tok.padding_side = "left"
    prompts = render_prompts(tok, [r["input_text"] for r in rows], "auto")
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    model.eval()
    texts = []
    with torch.no_grad():
        for k in range(0, len(prompts), 100):
            enc = tok(prompts[k : k + 100], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return score_answers([{"input_text": r["input_text"], "label": r["gold"]} for r in rows], texts, "number", "auto")["accuracy"]


def teacher_answers(teacher_dir: Path, rows: list[dict], work: Path) -> list[str]:
    """The teacher's greedy answers to ``rows`` from its vLLM pool (cached in work/teacher_answers.jsonl)."""
    from rayapp.config.base import EngineConfig, SamplingConfig
    from rayapp.data.readers import read_jsonl, write_jsonl_atomic
    from rayapp.teachers.pool import VLLMEnginePool

    path = work / "teacher_answers.jsonl"
    if path.exists():
        cached = read_jsonl(path)
        if [c["input_text"] for c in cached] == [r["input_text"] for r in rows]:
            return [c["output_text"] for c in cached]
    engine = EngineConfig(max_model_len=128, max_num_seqs=128, kv_cache_gib=1, cpu_threads_bind="all")
    with VLLMEnginePool(teacher_dir, engine, name="teacher") as pool:
        outs = pool.generate([[{"role": "user", "content": r["input_text"]}] for r in rows], SamplingConfig(temperature=0.0, max_tokens=48))
    write_jsonl_atomic(path, [{"input_text": r["input_text"], "output_text": c.text} for r, c in zip(rows, outs, strict=True)])
    return [c.text for c in outs]


def run_sft(student_dir: Path, rows: list[dict], answers: list[str], test: list[dict], steps: int, lr: float, eval_every: int,
            batch: int = 16, save_to: Path | None = None) -> list[dict]:
    """(a): SFT on the teacher's answers; [{step, tokens, accuracy}] with accuracy every ``eval_every`` steps
    (``save_to``: also write the tuned model there: the warm start)."""
    import torch

    from rayapp.algorithms.sft import token_nll_sum
    from rayapp.data.collate import collate_sft
    from rayapp.data.formats import TextExample
    from rayapp.data.tokenize import encode_example
    from rayapp.models.io import load_causal_lm, load_tokenizer
    from rayapp.training.loop import global_batch_indices

    tok = load_tokenizer(str(student_dir))
    items = [encode_example(tok, TextExample(r["input_text"], a), 128) for r, a in zip(rows, answers, strict=True) if a.strip()]
    torch.manual_seed(0)
    model = load_causal_lm(str(student_dir)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    curve, tokens = [{"step": 0, "tokens": 0, "accuracy": greedy_accuracy(model, tok, test)}], 0
    for step in range(steps):
        b = collate_sft([items[i] for i in global_batch_indices(step, len(items), batch, 0)], tok.pad_token_id)
        loss_sum, n = token_nll_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(n)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "tokens": tokens, "accuracy": greedy_accuracy(model, tok, test)})
            print(f"SFT step {step + 1}/{steps}: tokens {tokens} held-out accuracy {curve[-1]['accuracy']:.3f}", flush=True)
    if save_to is not None:
        from rayapp.models.io import save_model_atomic

        save_model_atomic(model, tok, save_to)
    return curve


def run_opd(student_dir: Path, teacher_dir: Path, prompts_file: Path, test_file: Path, out: Path, args, top_k: int
            ) -> tuple[list[dict], dict]:
    """(b): the distill recipe with method: on_policy; [{step, tokens, accuracy}] and its eval.json."""
    from rayapp.config.loader import load_job_dict
    from rayapp.data.readers import read_jsonl
    from rayapp.training.distill.recipe import run

    cfg = load_job_dict({
        "kind": "distill", "name": "opd_bench", "method": "on_policy", "task_type": "number",
        "model": {"path": str(student_dir), "max_seq_len": 128}, "student": {"init": "from_model"},
        "teacher": {"path": str(teacher_dir), "engine": {"max_model_len": 160, "max_num_seqs": 128, "kv_cache_gib": 1}},
        "data": {"train": str(prompts_file)},
        "on_policy": {"iterations": args.opd_iterations, "prompts_per_iteration": args.opd_prompts, "samples_per_prompt": args.opd_samples,
                      "max_new_tokens": 40, "temperature": 1.0, "eval_examples": 200, "top_k": top_k,
                      "engine": {"max_model_len": 128, "max_num_seqs": 128, "kv_cache_gib": 1}},
        "train": {"global_batch_size": 16, "micro_batch_size": 16, "learning_rate": args.opd_lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0,
                  "eval_every": args.opd_eval_every, "checkpoint_every": 10_000, "seed": 0},
        "evaluation": {"data": str(test_file), "max_examples": 200, "max_new_tokens": 40},
        "resources": {"num_workers": 1},
        "output_dir": str(out),
    })
    shutil.rmtree(out, ignore_errors=True)  # a fresh student: no checkpoint of an earlier run to resume
    run(cfg, in_process=True)
    ev = json.loads((out / "eval.json").read_text())
    curve = [{"step": 0, "tokens": 0, "accuracy": ev["initial_answer_accuracy"]}]
    for r in read_jsonl(out / "metrics.jsonl"):
        if "val_answer_accuracy" in r:
            curve.append({"step": r["step"], "tokens": int(r["tokens_trained"]), "accuracy": r["val_answer_accuracy"],
                          "reverse_kl": r["reverse_kl"]})
    return curve, ev


def tokens_to_reach(curve: list[dict], target: float) -> int | None:
    return next((p["tokens"] for p in curve if p["accuracy"] >= target - 1e-9), None)


def smoothed(curve: list[dict], w: int = 3) -> list[dict]:
    """Each point's accuracy as the mean of it and the w - 1 evaluations before it (a 200-question
    accuracy moves by +-0.035 (one std) between evaluations from noise alone)."""
    return [{**p, "accuracy": sum(q["accuracy"] for q in curve[max(0, i - w + 1) : i + 1]) / len(curve[max(0, i - w + 1) : i + 1])}
            for i, p in enumerate(curve)]


def add_smoothed_ratios(res: dict) -> None:
    """``ratio_smoothed`` (and ``sampled_ratio_smoothed``): the ratio on curves smoothed over 3 evaluations."""
    sft = smoothed(res["sft"])
    for name, prefix in (("opd", ""), ("opd_sampled", "sampled_")):
        if name not in res:
            continue
        opd = smoothed(res[name])
        common = min(max(p["accuracy"] for p in sft), max(p["accuracy"] for p in opd))
        a, b = tokens_to_reach(sft, common), tokens_to_reach(opd, common)
        res[f"{prefix}ratio_smoothed"] = round(a / b, 2) if a and b else None
        res[f"{prefix}common_best_smoothed"] = round(common, 4)
        res[f"{prefix}tokens_sft_smoothed"], res[f"tokens_{name}_smoothed"] = a, b


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = (("sft", "SFT on teacher-written answers", "o-"), ("opd", f"on-policy distillation (top_k {res.get('opd_top_k')})", "s-"),
              ("opd_sampled", "on-policy, sampled token only (top_k 0)", "^-"))
    for key, label, style in curves:
        if key not in res:
            continue
        pts = [p for p in res[key] if p["tokens"] > 0]
        ax.plot([p["tokens"] for p in pts], [p["accuracy"] for p in pts], style, ms=3, label=label)
    ax.axhline(res["teacher_accuracy"], ls="--", c="gray", label=f"teacher ({res['teacher_accuracy']:.2f})")
    ax.axhline(res["common_best"], ls=":", c="k", lw=0.8, label=f"best both reach ({res['common_best']:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel("held-out accuracy (greedy, 200 questions)")
    ax.set_title(f"chain_sum: on-policy distillation vs SFT (token ratio {res['ratio']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000, help="questions the students train on")
    ap.add_argument("--teacher-model", default="tiny:layers=4,hidden=128")
    ap.add_argument("--teacher-train", type=int, default=1600)
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--sft-steps", type=int, default=450)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--sft-eval-every", type=int, default=25)
    ap.add_argument("--warmup-sft-steps", type=int, default=100, help="SFT steps on the teacher's answers before both arms start (0: none)")
    ap.add_argument("--warmup-lr", type=float, default=1e-3, help="learning rate of the warm-start SFT")
    ap.add_argument("--opd-iterations", type=int, default=45)
    ap.add_argument("--opd-prompts", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--opd-samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--opd-lr", type=float, default=2e-4)
    ap.add_argument("--opd-eval-every", type=int, default=3)
    ap.add_argument("--opd-top-k", type=int, default=20, help="on_policy.top_k of (b); when > 0 the sampled-token-only variant (top_k 0) runs too")
    ap.add_argument("--no-sampled", action="store_true", help="skip the sampled-token-only variant")
    ap.add_argument("--reuse-sft", action="store_true", help="reuse the SFT curve of bench/results/opd_vs_sft.json when its settings match")
    ap.add_argument("--work", default="outputs/bench_opd_vs_sft")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--replot", action="store_true", help="redraw the plot (and the smoothed ratios) from bench/results/opd_vs_sft.json")
    args = ap.parse_args()
    if args.replot:
        res = json.loads((RESULTS / "opd_vs_sft.json").read_text())
        add_smoothed_ratios(res)
        (RESULTS / "opd_vs_sft.json").write_text(json.dumps(res, indent=2) + "\n")
        plot(res, RESULTS / "opd_vs_sft.png")
        print({k: v for k, v in res.items() if "ratio" in k or "common" in k or k.startswith("tokens")})
        return
    import torch

    torch.set_num_threads(args.threads)
    from bench.distill_quality import train_teacher, worked_answer
    from rayapp.data.readers import write_jsonl_atomic
    from rayapp.evaluation import evaluate_answers
    from rayapp.models.student import from_teacher_layers
    from rayapp.teachers.templates import answers_match, parse_rationale

    t0 = time.perf_counter()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    test = chain_rows(200, seed=12345)
    labeled = chain_rows(args.teacher_train, seed=4242, exclude={r["input_text"] for r in test})
    prompts = chain_rows(args.prompts, seed=777, exclude={r["input_text"] for r in test + labeled})
    teacher_dir, teacher_s = train_teacher(labeled, work, args.teacher_model, args.teacher_steps, args.teacher_lr, seed=0)
    test_rows = [{"input_text": r["input_text"], "label": r["gold"]} for r in test]
    t_acc = evaluate_answers(teacher_dir, test_rows, task_type="number", extract="auto", max_new_tokens=40)["accuracy"]
    print(f"teacher {args.teacher_model}: {args.teacher_steps} steps ({teacher_s}s), held-out accuracy {t_acc:.3f}", flush=True)
    student_dir = from_teacher_layers(teacher_dir, work / "student_init", keep_every=3)
    answers = teacher_answers(teacher_dir, prompts, work)
    warm = None
    if args.warmup_sft_steps:  # the shared start: a short SFT on the teacher's answers, as Thinking Machines start from a mid-trained student
        warm = run_sft(student_dir, prompts, answers, test, args.warmup_sft_steps, args.warmup_lr, args.warmup_sft_steps,
                       save_to=work / "student_warm")
        student_dir = work / "student_warm"
        print(f"warm start: {args.warmup_sft_steps} SFT steps, {warm[-1]['tokens']} tokens, held-out accuracy {warm[-1]['accuracy']:.3f}")

    right = sum(answers_match(parse_rationale(a, "number")[1], r["gold"], "number") for r, a in zip(prompts, answers, strict=True))
    print(f"teacher answered {len(prompts)} prompts; right on {right / len(prompts):.3f}", flush=True)
    sft_key = {k: getattr(args, k) for k in ("prompts", "teacher_model", "teacher_train", "teacher_steps", "teacher_lr", "sft_steps",
                                               "sft_lr", "sft_eval_every", "warmup_sft_steps", "warmup_lr")}
    saved = json.loads((RESULTS / "opd_vs_sft.json").read_text()) if (RESULTS / "opd_vs_sft.json").exists() else {}
    if args.reuse_sft and saved.get("sft_settings") == sft_key:
        sft, sft_s = saved["sft"], saved["seconds"]["sft"]
        print(f"SFT: reusing the curve in {RESULTS / 'opd_vs_sft.json'}", flush=True)
    else:
        t_sft = time.perf_counter()
        sft = run_sft(student_dir, prompts, answers, test, args.sft_steps, args.sft_lr, args.sft_eval_every)
        sft_s = time.perf_counter() - t_sft

    write_jsonl_atomic(work / "prompts.jsonl", [{"input_text": r["input_text"], "output_text": worked_answer(r)} for r in prompts])
    write_jsonl_atomic(work / "test.jsonl", [{"input_text": r["input_text"], "output_text": r["gold"]} for r in test])
    variants = {"opd": args.opd_top_k, **({"opd_sampled": 0} if args.opd_top_k and not args.no_sampled else {})}  # name -> top_k
    runs, seconds = {}, {"teacher_train": teacher_s, "sft": round(sft_s, 1)}
    for name, k in variants.items():
        t = time.perf_counter()
        runs[name] = run_opd(student_dir, teacher_dir, work / "prompts.jsonl", work / "test.jsonl", work / name, args, k)
        seconds[name] = round(time.perf_counter() - t, 1)

    best_sft = max(p["accuracy"] for p in sft)
    res = {
        "target": 2.0,
        "metric": "student training tokens SFT on teacher-written answers needs / tokens on-policy distillation needs to first "
                  "reach the best held-out accuracy both attain",
        "task": "reasoning-gym chain_sum, 2-3 one-digit terms; 200 held-out questions, greedy",
        "teacher": f"{args.teacher_model} tuned on {len(labeled)} worked answers, {args.teacher_steps} steps",
        "teacher_accuracy": t_acc, "teacher_prompt_answers_right": right / len(prompts),
        "student_start": "teacher layers 0 and 3 (from_teacher_layers, keep_every 3)"
                         + (f", then {args.warmup_sft_steps} SFT steps on the teacher's answers ({warm[-1]['tokens']} tokens, "
                            f"not counted below; held-out accuracy {warm[-1]['accuracy']:.3f})" if warm else ""),
        "prompts": len(prompts), "best_sft": best_sft,
        "settings": {k: v for k, v in vars(args).items() if k not in ("replot", "work", "reuse_sft")}, "sft_settings": sft_key,
        "sft": sft,
    }
    rows = [("SFT on teacher answers", sft, None, None, sft_s)]
    for name, k in variants.items():
        curve, ev = runs[name]
        common = min(best_sft, max(p["accuracy"] for p in curve))
        need_sft, need_opd = tokens_to_reach(sft, common), tokens_to_reach(curve, common)
        ratio = round(need_sft / need_opd, 2) if need_sft and need_opd else None
        prefix = "" if name == "opd" else "sampled_"
        res.update({f"{prefix}ratio": ratio, f"{prefix}common_best": common, f"best_{name}": max(p["accuracy"] for p in curve),
                    f"{prefix}tokens_sft": need_sft, f"tokens_{name}": need_opd, f"{name}_top_k": k,
                    f"{name}_final_transformers_accuracy": ev.get("student_answer_accuracy"),
                    f"{name}_reverse_kl_first": ev.get("reverse_kl_first"), f"{name}_reverse_kl_last": ev.get("reverse_kl_last"),
                    name: curve})
        label = f"on-policy, top-{k} reverse KL" if k else "on-policy, sampled token only"
        rows.append((label, curve, (common, need_sft, need_opd), ratio, seconds[name]))
    res["seconds"] = {**seconds, "total": round(time.perf_counter() - t0, 1)}
    res = {"ratio": res.pop("ratio"), **res}
    add_smoothed_ratios(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "opd_vs_sft.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / "opd_vs_sft.png")
    print(f"\n{'method':<36}{'best acc':>9}{'common best':>12}{'SFT tokens':>11}{'its tokens':>11}{'ratio':>7}{'total tokens':>13}{'seconds':>8}")
    for label, curve, reach, ratio, secs in rows:
        common, need_sft, need = reach or ("-", "-", "-")
        print(f"{label:<36}{max(p['accuracy'] for p in curve):>9.3f}{str(common):>12}{str(need_sft):>11}{str(need):>11}"
              f"{str(ratio or '-'):>7}{curve[-1]['tokens']:>13}{secs:>8.0f}")
    print(f"teacher held-out accuracy {t_acc:.3f}; SFT needs {res['tokens_sft']} tokens to reach {res['common_best']:.3f}: "
          f"ratio (SFT tokens / on-policy tokens) = {res['ratio']} (target 2.0)"
          + (f"; sampled-token-only variant: {res['sampled_ratio']} at {res['sampled_common_best']:.3f}" if "sampled_ratio" in res else ""))
    print(f"on-policy final accuracy: engine {runs['opd'][0][-1]['accuracy']:.3f}, transformers {res['opd_final_transformers_accuracy']}")
    print(f"wrote {RESULTS / 'opd_vs_sft.json'} and opd_vs_sft.png ({res['seconds']['total']:.0f}s)")

if __name__ == "__main__":
    main()
