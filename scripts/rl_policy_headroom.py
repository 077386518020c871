"""How much an RL run could gain from bench/rl_iteration.py's SFT policy: for each number of SFT
steps, the policy's greedy held-out accuracy beside its sampled accuracy at --temperature (default 1;
pass@1, the mean over --k samples, which GRPO's reward measures) and pass@k (any of the k right), on the same
200 held-out chain_sum questions, with transformers' generate in this process (no Ray, no vLLM).

GRPO raises pass@1 towards pass@k; greedy accuracy follows only where the policy's mode is no
better than its samples. Where greedy is well above pass@1, the first gains of RL go to the sampled
tail the greedy answer never visits (issue 15's plateau at T = 1); at a temperature where pass@1 is
close to greedy, pass@k bounds what sharpening can give the greedy answer.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/rl_policy_headroom.py --steps 150 250 400 [--temperature 0.5]

Trains (or reuses, by fingerprint) one SFT policy per step count under --work, as the bench does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rayapp.models.io import load_causal_lm, load_tokenizer  # noqa: E402
from rayapp.rewards import exact_match  # noqa: E402
from rayapp.training.rlhf_rollout import prompt_token_ids  # noqa: E402


def headroom(model_dir: Path, test: list[dict], k: int, temperature: float = 1.0, batch: int = 50) -> dict:
    tok, lm = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir)).eval()
    tok.padding_side = "left"
    prompts = [prompt_token_ids(tok, [{"role": "user", "content": r["input_text"]}]) for r in test]  # as the engine sees them
    greedy = pass1 = passk = 0.0
    for start in range(0, len(test), batch):
        enc = tok.pad({"input_ids": prompts[start : start + batch]}, return_tensors="pt")
        width = enc["input_ids"].shape[1]
        with torch.no_grad():
            g = lm.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            s = lm.generate(**enc, max_new_tokens=32, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            num_return_sequences=k, pad_token_id=tok.pad_token_id)
        for i, r in enumerate(test[start : start + batch]):
            row = {"answer": r["gold"]}
            greedy += exact_match(tok.decode(g[i, width:], skip_special_tokens=True), row)
            hits = [exact_match(tok.decode(s[i * k + j, width:], skip_special_tokens=True), row) for j in range(k)]
            pass1 += sum(hits) / k
            passk += max(hits)
    n = len(test)
    return {"greedy": greedy / n, "pass1": pass1 / n, f"pass{k}": passk / n, "temperature": temperature}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 250, 400], help="SFT steps of each policy")
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of pass@1 and pass@k")
    ap.add_argument("--k", type=int, default=16, help="samples per question (bench/rl_iteration.py's group size)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "rl_headroom"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from distill_quality import train_teacher
    from rl_iteration import make_sets

    sft, _, test = make_sets(1000, 1000, 200)
    t = args.temperature
    print(f"{'SFT steps':>9} {'greedy':>7} {f'pass@1 T={t}':>12} {f'pass@{args.k} T={t}':>13}")
    for steps in args.steps:
        model_dir, _ = train_teacher(sft, Path(args.work) / f"sft{steps}", "tiny:layers=4,hidden=128", steps, args.sft_lr, seed=0)
        torch.manual_seed(0)  # the samples
        h = headroom(model_dir, test, args.k, t)
        print(f"{steps:>9} {h['greedy']:>7.3f} {h['pass1']:>12.3f} {h[f'pass{args.k}']:>13.3f}", flush=True)
        print(json.dumps({"sft_steps": steps, **h}), flush=True)


if __name__ == "__main__":
    main()
