"""GRPO that learns the task: greedy held-out exact-match accuracy before and after RL, from a
partly right policy, all on this machine.

Task: reasoning-gym ``chain_sum`` (3 one-digit terms, "4 - 1 - 7 ="), as bench/distill_quality.py
and jobs/demo.yaml. Three disjoint question sets: worked answers to tune on ("4 - 1 = 3. 3 - 7 = -4.
So the answer is -4."), RL prompts (answer only, no worked answer), and ``--test`` held-out questions.

1. SFT the locally built ``tiny:layers=4,hidden=128`` Llama (the demo's teacher) on the worked
   answers for only ``--sft-steps`` steps (in this process, bench/distill_quality.py's
   ``train_teacher``; the demo's 800 steps reach ~0.8): a policy that answers some held-out
   questions right, most not;
2. GRPO from it (jobs/rlhf_grpo.yaml, ``kind: rlhf``): 400 iterations of 32 prompts x 8 samples,
   one optimizer step per iteration at lr 5e-5, from a vLLM CPU engine at T = 0.5 (log-probs at
   that temperature). The temperature is what matters: this policy answers greedily (~0.3) far
   better than its T = 1 samples do (pass@1 ~0.2, scripts/rl_policy_headroom.py), so at T = 1 the
   gains go to a sampled tail the greedy answer never visits and greedy accuracy stays flat (ratio
   0.97-1.23 over five runs, bench/results/rl_iteration.json ``other_runs``); sampled near the mode,
   the groups compare the answers greedy decoding chooses between (scripts/rl_reference_grpo.py,
   no Ray: T 1 -> 0.305, T 0.5 -> 0.42, T 0.3 -> 0.43 after 100 iterations). The gain is slow: these
   settings reach ~0.41 after 100 iterations, ~0.44 after 200 and ~0.49 after 400;
   reward = exact match of the final answer only, updates on 2 Ray Train workers, new weights into
   the engine after each iteration (``rl.weight_sync: shm``: through Ray's object store, loaded
   in memory by CPU engines whose engine core runs in their actor); the held-out set is the job's
   validation data, so ``eval_reward_exact_match`` (greedy, vLLM) lands in metrics.jsonl at step 0
   (the SFT policy) and every ``--eval-every`` iterations, and the job's report.html plots it.
   Once per seed in ``--seeds`` (train.seed: prompt order, sampling), from the same SFT policy;
3. the engine/trainer mismatch: the same engine samples at T = 0.7 from the SFT policy and the
   trainer scores the sampled tokens at T = 0.7 (what rayapp now does) and at T = 1 (what it did):
   KL(engine || trainer) per token, each way.

    .venv/bin/python bench/rl_iteration.py [--iterations 400] [--sft-steps 400] [--lr 5e-5] [--temperature 0.5] [--n 8] [--seeds 0 1]

On a machine shared with other jobs, run it with OMP_NUM_THREADS=1: the in-process SFT's two
OpenMP threads then stop spinning against the other jobs (here 20x faster: 400 steps in 92 s).

Prints the accuracy table and the time split, and writes bench/results/rl_iteration.json with
``ratio`` = mean over seeds of held-out accuracy after RL / before (``target`` 1.5),
``sync_share`` = weight-sync seconds / iteration seconds (goal <= 0.02, the performance issue's) and the sync phases.
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
sys.path.insert(0, str(ROOT / "bench"))

from rayapp.data.readers import read_jsonl, write_jsonl_atomic  # noqa: E402

ACC = "eval_reward_exact_match"


def make_sets(n_sft: int, n_rl: int, n_test: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint chain_sum questions: (worked-answer rows, RL prompts, held-out prompts)."""
    from distill_quality import make_rows

    test = make_rows(n_test, seed=1)
    sft = make_rows(n_sft, seed=2, exclude={r["input_text"] for r in test})
    rl = make_rows(n_rl, seed=3, exclude={r["input_text"] for r in test + sft})
    return sft, rl, test


def mismatch(pool, model_dir: Path, prompts: list[dict], temperature: float) -> dict:
    """Engine samples at ``temperature`` (its processed log-probs) scored by the trainer's model at
    ``temperature`` and at 1: per-token KL(engine || trainer) (k3) of each."""
    import torch

    from rayapp.algorithms.rl import mismatch_kl
    from rayapp.algorithms.sft import token_logps
    from rayapp.config.base import SamplingConfig
    from rayapp.models.io import load_causal_lm, load_tokenizer
    from rayapp.training.rlhf_rollout import collate_rollouts, prompt_token_ids

    pool.update_weights(str(model_dir))
    tok, lm = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir)).eval()
    messages = [[{"role": "user", "content": p["input_text"]}] for p in prompts]
    outs = pool.generate(messages, SamplingConfig(temperature=temperature, max_tokens=32, n=4, logprobs=0))
    rows = [{"prompt_ids": prompt_token_ids(tok, messages[c.prompt_index]), "response_ids": list(c.token_ids), "score": 0.0,
             "rollout_logps": [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]} for c in outs if c.token_ids]
    out = {"temperature": temperature, "tokens": 0}
    kl = {"trainer_at_sampling_temperature": 0.0, "trainer_at_1": 0.0}
    for k in range(0, len(rows), 32):
        b = collate_rollouts(rows[k : k + 32], tok.pad_token_id)
        with torch.no_grad():
            logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for key, t in (("trainer_at_sampling_temperature", temperature), ("trainer_at_1", 1.0)):
            logp, mask = token_logps(logits, b["labels"], t)
            kl[key] += float(mismatch_kl(logp, b["rollout_logp"], mask.float()))
        out["tokens"] += int(mask.sum())
    out.update({f"mismatch_kl_{k}": v / max(out["tokens"], 1) for k, v in kl.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-rows", type=int, default=1000)
    ap.add_argument("--rl-prompts", type=int, default=1000)
    ap.add_argument("--test", type=int, default=200, help="held-out questions")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=0.5, help="rollout sampling temperature")
    ap.add_argument("--n", type=int, default=8, help="GRPO group size (sampling.n)")
    ap.add_argument("--prompts-per-iteration", type=int, default=32)
    ap.add_argument("--steps-per-iteration", type=int, default=1, help="optimizer steps per iteration")
    ap.add_argument("--kl-coeff", type=float, default=0.0, help="rl.kl_coeff (k3 to the SFT policy, in the loss)")
    ap.add_argument("--update-epochs", type=int, default=1)
    ap.add_argument("--warmup-ratio", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--scale-by-std", type=int, default=1, help="1: GRPO's std normalisation; 0: Dr. GRPO")
    ap.add_argument("--step-reward", type=float, default=0.0,
                    help="weight of the chain_steps process reward beside exact match (0: exact match alone)")
    ap.add_argument("--set", nargs="*", default=[], help="extra job overrides (key=value)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/rl_iteration.json)")
    ap.add_argument("--skip-mismatch", action="store_true")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_rl"))
    args = ap.parse_args()

    from distill_quality import train_teacher, worked_answer

    from rayapp.config import load_job
    from rayapp.runtime import ensure_ray
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.teachers.weight_sync import loads_in_memory
    from rayapp.training import rlhf

    work = Path(args.work)
    t0 = time.perf_counter()
    sft_rows, rl_rows, test_rows = make_sets(args.sft_rows, args.rl_prompts, args.test)
    write_jsonl_atomic(work / "rl_train.jsonl", [{"input_text": r["input_text"], "answer": r["gold"]} for r in rl_rows])
    write_jsonl_atomic(work / "test.jsonl", [{"input_text": r["input_text"], "answer": r["gold"]} for r in test_rows])
    sft_dir, sft_s = train_teacher(sft_rows, work / "sft", "tiny:layers=4,hidden=128", args.sft_steps, args.sft_lr, seed=0)
    print(f"SFT: {len(sft_rows)} worked answers ('{sft_rows[0]['input_text']}' -> '{worked_answer(sft_rows[0])}'), "
          f"{args.sft_steps} steps, {sft_s}s", flush=True)

    step = f", {{function: chain_steps, weight: {args.step_reward}}}" if args.step_reward else ""
    rewards = f"[{{function: exact_match}}{step}]"
    reward_text = f"exact match + {args.step_reward} x chain_steps" if args.step_reward else "exact-match reward only"
    overrides = [f"model.path={sft_dir}", "model.max_seq_len=128", f"data.train={work / 'rl_train.jsonl'}",
                 f"data.validation={work / 'test.jsonl'}", f"rl.rewards={rewards}", f"rl.kl_coeff={args.kl_coeff}",
                 f"rl.update_epochs={args.update_epochs}", f"train.warmup_ratio={args.warmup_ratio}",
                 f"rl.scale_by_std={'true' if args.scale_by_std else 'false'}",
                 f"rl.iterations={args.iterations}", f"rl.prompts_per_iteration={args.prompts_per_iteration}",
                 f"rl.eval_prompts={args.test}", f"sampling={{temperature: {args.temperature}, max_tokens: {args.max_tokens}, n: {args.n}}}",
                 f"train.learning_rate={args.lr}", f"train.eval_every={args.eval_every}", f"train.checkpoint_every={args.iterations}",
                 f"train.global_batch_size={args.prompts_per_iteration * args.n // args.steps_per_iteration}",
                 f"train.micro_batch_size={args.prompts_per_iteration * args.n // args.steps_per_iteration // 4}", *args.set]
    ensure_ray()
    base = load_job(ROOT / "jobs/rlhf_grpo.yaml", overrides)
    pool = VLLMEnginePool(sft_dir, base.engine, name="rollout")  # one engine for every seed and the mismatch check
    transport = ("shm, in memory (Ray object store -> each engine's actor -> load_weights)" if loads_in_memory(pool)
                 else "shm, staged (Ray object store -> engine node /dev/shm -> reload_weights)")
    runs = []
    try:
        for seed in args.seeds:
            out = work / f"grpo_seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", [*overrides, f"output_dir={out}", f"train.seed={seed}"])
            t1 = time.perf_counter()
            rlhf.run(cfg, pool=pool)
            rows = read_jsonl(out / "metrics.jsonl")
            runs.append({"seed": seed, "rows": rows, "seconds": time.perf_counter() - t1, "out": out})
        mis = {} if args.skip_mismatch else mismatch(pool, sft_dir, [{"input_text": r["input_text"]} for r in rl_rows[:32]], 0.7)
    finally:
        pool.shutdown()

    print(f"\n{'seed':>4} {'iter':>4} {'reward':>7} {'held-out acc':>12} {'mismatch_kl':>11} {'tis_capped':>10} {'len':>5} {'mixed':>5} {'trunc':>5} {'gen s':>6} {'train s':>7} {'sync ms':>7}")
    for run in runs:
        for r in run["rows"]:
            if "reward_mean" not in r:
                print(f"{run['seed']:>4} {r['step']:>4} {'':>7} {r.get(ACC, float('nan')):>12.3f}")
                continue
            acc = f"{r[ACC]:.3f}" if ACC in r else ""
            print(f"{run['seed']:>4} {r['step']:>4} {r['reward_mean']:>7.3f} {acc:>12} {r['mismatch_kl']:>11.2e} {r['tis_capped']:>10.4f} "
                  f"{r['response_len']:>5.1f} {r.get('groups_mixed', float('nan')):>5.2f} {r.get('truncated', float('nan')):>5.2f} {r['time_generate_s']:>6.2f} {r['time_train_s']:>7.2f} {r['time_sync_s'] * 1000:>7.1f}")
    curves = {run["seed"]: [(r["step"], round(r[ACC], 4)) for r in run["rows"] if ACC in r] for run in runs}
    before = [c[0][1] for c in curves.values()]
    after = [c[-1][1] for c in curves.values()]
    acc_before, acc_after = sum(before) / len(before), sum(after) / len(after)
    it_rows = [r for run in runs for r in run["rows"] if "reward_mean" in r]
    split = {k: sum(r[f"time_{k}_s"] for r in it_rows) / len(it_rows) for k in ("generate", "score", "train", "sync", "iteration")}
    phases = {k: sum(r.get(f"sync_{k}", 0.0) for r in it_rows) / len(it_rows) for k in ("gather_s", "transfer_s", "load_s", "bytes")}
    summary = rlhf.summarize(runs[0]["rows"])
    result = {
        "ratio": acc_after / acc_before if acc_before else float("nan"),
        "target": 1.5,
        "metric": f"greedy held-out exact-match accuracy on {args.test} chain_sum questions after GRPO / before (the SFT policy), mean of seeds {args.seeds}",
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "accuracy_after_per_seed": dict(zip(args.seeds, after, strict=True)),
        "accuracy_curve_per_seed": curves,
        "sync_share": split["sync"] / split["iteration"],
        "sync_share_goal": 0.02,
        "algorithm": "grpo",
        "iterations": args.iterations,
        "reward_first": summary.get("reward_first"),
        "reward_last5": summary.get("reward_last5"),
        "reward_curve_per_seed": {run["seed"]: [round(r["reward_mean"], 4) for r in run["rows"] if "reward_mean" in r] for run in runs},
        "mismatch_kl_per_iteration_mean": sum(r["mismatch_kl"] for r in it_rows) / len(it_rows),
        "tis_capped_mean": sum(r["tis_capped"] for r in it_rows) / len(it_rows),
        "mismatch_at_T0.7": mis,
        "time_split_s": split,
        "sync_transport": transport,
        "sync_phases_mean": {k: round(v, 4) for k, v in phases.items()},
        "rollouts_per_iteration": args.prompts_per_iteration * args.n,
        "setup": f"tiny Llama (4 layers, hidden 128) SFT {args.sft_steps} steps (lr {args.sft_lr}, batch 16) on {len(sft_rows)} worked "
                 f"chain_sum answers, then GRPO ({reward_text}, kl_coeff {args.kl_coeff}, T {args.temperature}, n {args.n}, {args.prompts_per_iteration} "
                 f"prompts/iteration, {args.steps_per_iteration} optimizer step(s)/iteration, lr {args.lr}, warm-up {args.warmup_ratio}, update_epochs {args.update_epochs}, "
                 f"scale_by_std {bool(args.scale_by_std)}, max_tokens {args.max_tokens}, rl.tis_cap 2{', ' + ', '.join(args.set) if args.set else ''}) on {len(rl_rows)} other questions; 1 vLLM CPU engine, "
                 "2 Ray Train CPU workers, shared 2-core machine",
        "sft_seconds": sft_s,
        "rl_seconds_per_seed": [round(run["seconds"], 1) for run in runs],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "report": [str(run["out"] / "report.html") for run in runs],
    }
    print(f"\nheld-out accuracy before {acc_before:.3f} -> after {acc_after:.3f} (per seed {after}): ratio {result['ratio']:.2f} (target 1.5)")
    print("mean time split of an iteration: " + ", ".join(f"{k} {v:.2f}s" for k, v in split.items()))
    print(f"sync share {result['sync_share']:.3f} (goal <= 0.02); mismatch KL per token in RL {result['mismatch_kl_per_iteration_mean']:.2e}")
    if mis:
        print(f"T=0.7 samples: KL(engine || trainer) {mis['mismatch_kl_trainer_at_sampling_temperature']:.2e} scored at T=0.7 (now) vs "
              f"{mis['mismatch_kl_trainer_at_1']:.2e} at T=1 (before the fix), {mis['tokens']} tokens")
    print(f"total {result['total_seconds']:.0f}s; reports {result['report']}")
    dest = Path(args.out) if args.out else ROOT / "bench" / "results" / "rl_iteration.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
