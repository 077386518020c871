"""GRPO (or PPO) on a checkable reward, starting from a briefly tuned policy: reward curve and the
time split of an iteration (generate / score / train / sync), all on this machine.

1. SFT the locally built tiny model on arithmetic (jobs/sft_tiny.yaml, ``--sft-steps`` steps) so
   that rollouts are well-formed often enough for the reward to be non-zero from the start;
2. run jobs/rlhf_grpo.yaml (or rlhf_ppo.yaml) from that policy for ``--iterations`` iterations:
   rollouts from a vLLM CPU engine, rewards = exact match of the final answer + 0.5 x format,
   updates on 2 Ray Train workers, new weights into the engine after each iteration with
   ``rl.weight_sync: shm`` (buckets through Ray's object store into the engine node's /dev/shm,
   reloaded in place; the same path crosses nodes on a cluster).

    .venv/bin/python bench/rl_iteration.py [--algorithm grpo|ppo] [--iterations 30] [--sft-steps 12]

Prints the per-iteration reward and time split, and writes bench/results/rl_iteration.json with
``ratio`` = mean reward of the last five iterations / reward of the first (``target`` 1.2) and
``sync_share`` = weight-sync seconds / iteration seconds (goal <= 0.05), with the sync split into
gather / transfer / load seconds and the bytes sent. The job's report.html
(in the printed output_dir) plots the reward curve and the time split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayapp.data.readers import read_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithm", choices=["grpo", "ppo"], default="grpo")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_rl"))
    ap.add_argument("--sft-dir", default=None, help="reuse an SFT output_dir instead of training one")
    args = ap.parse_args()

    from rayapp.config import load_job
    from rayapp.training import rlhf, sft

    out = Path(args.out)
    t0 = time.perf_counter()
    sft_dir = Path(args.sft_dir) if args.sft_dir else out / "sft"
    if not (sft_dir / "model" / "config.json").exists():
        sft_cfg = load_job(ROOT / "jobs/sft_tiny.yaml", [f"output_dir={sft_dir}", f"train.max_steps={args.sft_steps}", "train.eval_every=1000"])
        sft.run(sft_cfg)
    t_sft = time.perf_counter() - t0

    job = ROOT / f"jobs/rlhf_{args.algorithm}.yaml"
    rl_out = out / args.algorithm
    cfg = load_job(job, [f"output_dir={rl_out}", f"model.path={sft_dir / 'model'}", f"rl.iterations={args.iterations}",
                         f"train.learning_rate={args.lr}", f"train.checkpoint_every={args.iterations}"])
    import shutil

    shutil.rmtree(rl_out, ignore_errors=True)
    t1 = time.perf_counter()
    rlhf.run(cfg)
    t_rl = time.perf_counter() - t1
    rows = read_jsonl(rl_out / "metrics.jsonl")
    summary = rlhf.summarize(rows)

    print(f"\n{'iter':>4} {'reward':>7} {'exact':>6} {'format':>6} {'kl':>7} {'len':>5} {'gen s':>6} {'score s':>7} {'train s':>7} {'sync ms':>7} {'iter s':>6}")
    for r in rows:
        print(f"{r['step']:>4} {r['reward_mean']:>7.3f} {r.get('reward_exact_match', 0):>6.3f} {r.get('reward_format', 0):>6.3f} "
              f"{r['kl_ref']:>7.4f} {r['response_len']:>5.1f} {r['time_generate_s']:>6.2f} {r['time_score_s']:>7.2f} "
              f"{r['time_train_s']:>7.2f} {r['time_sync_s'] * 1000:>7.1f} {r['time_iteration_s']:>6.2f}")
    split = {k: summary.get(f"mean_time_{k}_s") for k in ("generate", "score", "train", "sync", "iteration")}
    print("\nmean time split of an iteration: " + ", ".join(f"{k} {v:.2f}s" for k, v in split.items() if v is not None))
    phases = {k: sum(r.get(f"sync_{k}", 0.0) for r in rows) / len(rows) for k in ("gather_s", "transfer_s", "load_s", "bytes")}
    print(f"weight sync per iteration: {sum(r['time_sync_s'] for r in rows) / len(rows) * 1000:.0f} ms = gather "
          f"{phases['gather_s'] * 1000:.0f} + transfer {phases['transfer_s'] * 1000:.0f} + load {phases['load_s'] * 1000:.0f} ms "
          f"(+ rank-0 bookkeeping) for {phases['bytes'] / 1e6:.1f} MB")
    evals = [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r]
    result = {
        "ratio": summary["reward_ratio"],
        "target": 1.2,
        "sync_share": summary.get("sync_share"),
        "sync_share_goal": 0.05,
        "algorithm": args.algorithm,
        "iterations": len(rows),
        "reward_first": summary["reward_first"],
        "reward_last5": summary["reward_last5"],
        # one iteration is 32 samples: the first-five mean says how much of the ratio is start-up noise
        "ratio_last5_over_first5": summary["reward_last5"] / (sum(r["reward_mean"] for r in rows[:5]) / len(rows[:5]) or float("nan")),
        "reward_curve": [round(r["reward_mean"], 4) for r in rows],
        "exact_match_curve": [round(r.get("reward_exact_match", 0.0), 4) for r in rows],
        "format_curve": [round(r.get("reward_format", 0.0), 4) for r in rows],
        "greedy_eval_reward": evals,
        "time_split_s": split,
        "sync_transport": "shm (Ray object store -> engine node /dev/shm -> reload_weights)",
        "sync_phases_mean": {k: round(v, 4) for k, v in phases.items()},
        "rollouts_per_iteration": cfg.rollouts_per_iteration,
        "setup": f"tiny Llama (2 layers, hidden 128) SFT {args.sft_steps} steps on arithmetic, then {args.algorithm} "
                 f"lr {args.lr}, 1 vLLM CPU engine, 2 Ray Train CPU workers, shared 2-core machine",
        "sft_seconds": round(t_sft, 1),
        "rl_seconds": round(t_rl, 1),
        "report": str(rl_out / "report.html"),
    }
    print(f"\nreward first {result['reward_first']:.3f} -> last five {result['reward_last5']:.3f}: ratio {result['ratio']:.2f} (target 1.2); "
          f"sync share {result['sync_share']:.3f} (goal <= 0.05); report {result['report']}")
    dest = ROOT / "bench" / "results" / "rl_iteration.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
