"""In-process GRPO reference for bench/rl_iteration.py: the same SFT policy, RL prompts, held-out
questions, exact-match reward and group advantages (rayapp.algorithms.rl.grpo_advantages), but
sampling with transformers' generate and a plain REINFORCE step (-A * log p at the sampling
temperature, response tokens up to and including EOS; on-policy, so the PPO ratio is 1) in one
process, no Ray, no vLLM, no weight sync. Used to tell a rayapp pipeline bug from the algorithm's
own behaviour on this task (issue 15): the greedy-accuracy drift at lr 1e-4 reproduces here.

Run bench/rl_iteration.py first (it writes outputs/bench_rl/{sft,rl_train.jsonl,test.jsonl}), then

    OMP_NUM_THREADS=1 .venv/bin/python scripts/rl_reference_grpo.py --iters 80 --lr 3e-5 --n 16 --P 8 --steps 2

--agg: token (token mean over the iteration), seq (per-sequence mean), const (Dr. GRPO's constant
normaliser, 32 tokens a row); --std 0: no group-std scaling (Dr. GRPO). Prints reward, share of mixed
groups, mean length and share truncated every 5 iterations, greedy held-out accuracy every --eval-every.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayapp.algorithms.rl import grpo_advantages  # noqa: E402
from rayapp.models.io import load_causal_lm, load_tokenizer  # noqa: E402
from rayapp.rewards import exact_match  # noqa: E402
from rayapp.training.rlhf_rollout import prompt_token_ids  # noqa: E402

EOS, PAD, MAX_NEW = 2, 3, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--T", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--n", type=int, default=8, help="group size")
    ap.add_argument("--P", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=int, default=1, help="0: Dr. GRPO (no std scaling)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per iteration")
    ap.add_argument("--agg", choices=["token", "seq", "const"], default="token")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_rl"),
                    help="holds sft/teacher/model, rl_train.jsonl and test.jsonl (bench/rl_iteration.py's work directory)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    work = Path(a.work)
    model_dir = str(work / "sft" / "teacher" / "model")
    tok, lm = load_tokenizer(model_dir), load_causal_lm(model_dir)
    for m in lm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    train = [json.loads(x) for x in open(work / "rl_train.jsonl")]
    test = [json.loads(x) for x in open(work / "test.jsonl")]

    def generate(rows, temperature, n):
        """(prompt width, prompt mask repeated n times, sequences): left-padded prompts."""
        ids = [prompt_token_ids(tok, [{"role": "user", "content": r["input_text"]}]) for r in rows]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), PAD)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, s in enumerate(ids):
            x[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = lm.generate(input_ids=x, attention_mask=mask, max_new_tokens=MAX_NEW, num_return_sequences=n,
                              eos_token_id=EOS, pad_token_id=PAD, **kw)
        return width, mask.repeat_interleave(n, 0), out

    def responses(out, width):
        """(response tokens, lengths up to and including EOS)."""
        r = out[:, width:]
        lens = []
        for row in r:
            k = (row == EOS).nonzero()
            lens.append(int(k[0]) + 1 if len(k) else r.size(1))
        return r, lens

    def texts(r, lens):
        return [tok.decode(r[i, : lens[i]], skip_special_tokens=True) for i in range(len(lens))]

    def evaluate():
        lm.eval()
        width, _, out = generate(test, 0, 1)
        r, lens = responses(out, width)
        return sum(exact_match(t, row) for t, row in zip(texts(r, lens), test, strict=True)) / len(test)

    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    print("iter 0 acc", evaluate(), flush=True)
    t0 = time.time()
    for it in range(1, a.iters + 1):
        rows = [train[i] for i in torch.randint(len(train), (a.P,), generator=g).tolist()]
        lm.eval()
        width, prompt_mask, out = generate(rows, a.T, a.n)
        r, lens = responses(out, width)
        rew = torch.tensor([exact_match(t, rows[i // a.n]) for i, t in enumerate(texts(r, lens))])
        adv = grpo_advantages(rew, a.n, scale_by_std=bool(a.std))
        mixed = (rew.view(-1, a.n).std(1) > 0).float().mean().item()
        mask = torch.zeros_like(r, dtype=torch.float)  # response tokens up to and including EOS
        for i, n_tok in enumerate(lens):
            mask[i, :n_tok] = 1
        attn = torch.cat([prompt_mask, mask.long()], 1)
        lm.train()
        per = len(lens) // a.steps
        for s in range(a.steps):
            sl = slice(s * per, (s + 1) * per)
            logits = lm(input_ids=out[sl], attention_mask=attn[sl]).logits[:, width - 1 : -1].float() / a.T
            logp = torch.log_softmax(logits, -1).gather(-1, r[sl].unsqueeze(-1)).squeeze(-1)
            per_token = -adv[sl].unsqueeze(1) * logp * mask[sl]
            if a.agg == "token":
                loss = per_token.sum() / mask[sl].sum()
            elif a.agg == "seq":
                loss = (per_token.sum(1) / mask[sl].sum(1)).mean()
            else:
                loss = per_token.sum() / (per * MAX_NEW)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
        if it % 5 == 0:
            print(f"iter {it} reward {rew.mean():.3f} mixed {mixed:.2f} len {sum(lens) / len(lens):.1f} "
                  f"trunc {sum(n_tok == MAX_NEW for n_tok in lens) / len(lens):.2f} ({time.time() - t0:.0f}s)", flush=True)
        if it % a.eval_every == 0:
            print(f"iter {it} acc {evaluate():.3f}", flush=True)


if __name__ == "__main__":
    main()
