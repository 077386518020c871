"""Ray Train recipe overhead vs a plain single-process PyTorch loop, in one run.

Same model, same tokenized data, same batches (global 8 = micro 4 x 2 accumulation), same
number of optimizer steps. The plain loop is what a user would write by hand
(`model(..., labels=...).loss.backward()`); the recipe is `rayapp.training.sft.run` with one
Ray Train worker. Throughput is supervised tokens per second over the steady-state steps
(the first step, with its warm-up allocations, is excluded on both sides); wall time
including start-up is reported separately. The recipe also runs in process (launch's no-Ray
mode: the same worker function and loop) and the CPU share of every process over the Ray run's
steady-state steps is printed: together they split the gap into the recipe's code and Ray's.

    .venv/bin/python bench/sft_overhead.py [--model smollm2-135m-instruct] [--steps 12] [--repeats 3]

The three runs are repeated ``--repeats`` times, in turn forward and backward (plain, in process,
Ray; then Ray, in process, plain), and each round's ratios come from its own plain loop: 12-step
windows on a 2-core machine swing by 10-15% between runs, which one round took for a result.

Writes bench/results/sft_overhead.json with {"ratio": median over rounds of recipe / plain
tokens/s, "target": 0.95}, every round's numbers, and the earlier runs kept in ``other_runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _procstat import print_shares, shares, snapshot  # noqa: E402

from rayapp.data.readers import read_jsonl  # noqa: E402


def plain_loop(model_dir: str, examples: list, pad_id: int, steps: int, micro: int, accum: int, lr: float) -> dict:
    import torch

    from rayapp.data.collate import collate_sft
    from rayapp.models.io import load_causal_lm
    from rayapp.training.loop import global_batch_indices

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_causal_lm(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rates = []
    t_all = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        idx = global_batch_indices(step, len(examples), micro * accum, seed=0)
        tokens = 0
        for k in range(accum):
            batch = collate_sft([examples[i] for i in idx[k * micro : (k + 1) * micro]], pad_id)
            tokens += int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.mean(rates[1:]), "wall_s": time.perf_counter() - t_all, "final_loss": float(loss) * accum}


class TrainingProfile:
    """Who uses the CPUs while the recipe trains: a /proc snapshot every second (a thread), and the
    shares over the seconds in which the training process computes (it uses at least half a core:
    the steps, not Ray's start-up or the export). The training process is Ray Train's worker, or
    this process in process. (metrics.jsonl cannot time the window: through Ray Train it reaches
    output_dir at checkpoints.)"""

    def __init__(self, trainer: str):
        import threading

        self.trainer, self.snaps, self.stop = trainer, [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self.snaps.append(snapshot())

    def shares(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        tick = os.sysconf("SC_CLK_TCK")
        busy = [i for i in range(1, len(self.snaps))
                if (self.snaps[i][1].get(self.trainer, 0) - self.snaps[i - 1][1].get(self.trainer, 0))
                >= 0.5 * tick * (self.snaps[i][0] - self.snaps[i - 1][0])]
        return shares(self.snaps[busy[0] - 1], self.snaps[busy[-1]]) if busy else {}


def recipe(model_ref: str, train_path: str, steps: int, micro: int, accum: int, lr: float, max_seq_len: int,
           in_process: bool = False) -> dict:
    """The sft recipe: through Ray Train (one worker), or ``in_process`` (rayapp.training.launch's
    no-Ray mode: the same worker function and loop in this process), which separates what the
    recipe's code costs from what running under Ray costs."""
    from rayapp.config import load_job_dict
    from rayapp.training.sft import run

    out = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    cfg = load_job_dict(
        {
            "kind": "sft",
            "name": "bench_sft",
            "model": {"path": model_ref, "max_seq_len": max_seq_len},
            "data": {"train": train_path},
            "train": {
                "max_steps": steps, "global_batch_size": micro * accum, "micro_batch_size": micro,
                "learning_rate": lr, "warmup_ratio": 0, "min_lr_ratio": 1.0,
                "checkpoint_every": 10_000, "eval_every": 10_000,
            },
            "resources": {"num_workers": 1},
            "output_dir": str(out),
        }
    )
    t0 = time.perf_counter()
    profile = TrainingProfile("python sft_overhead.py" if in_process else "ray::RayTrainWorker")
    if in_process:
        from rayapp.data.sft import load_sft_dataset
        from rayapp.models.io import load_tokenizer, resolve_model
        from rayapp.training.launch import launch
        from rayapp.training.outputs import prepare_output
        from rayapp.training.sft import sft_worker

        model_dir = str(resolve_model(model_ref))
        ds = load_sft_dataset(train_path, load_tokenizer(model_dir), cfg.data, max_seq_len)
        launch(sft_worker, cfg, in_process=True, store=prepare_output(cfg), model_dir=model_dir, train=ds.examples, val=None)
    else:
        run(cfg)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # the run's checkpoint and model: 2.2 GB a run
    return {"tokens_per_s": statistics.mean(r["units_per_s"] for r in rows[1:]), "wall_s": wall, "final_loss": rows[-1]["loss"],
            "cpu_share_by_process": profile.shares()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT / "data/sft_chat/train.jsonl"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three runs (the headline is their median)")
    args = ap.parse_args()
    lr = 1e-5

    from rayapp.config.base import DataConfig
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_tokenizer, resolve_model

    model_dir = str(resolve_model(args.model))
    tok = load_tokenizer(model_dir)
    ds = load_sft_dataset(args.data, tok, DataConfig(train=args.data), args.max_seq_len)

    print(f"model {args.model}, {len(ds.examples)} examples, {args.steps} steps of {args.micro}x{args.accum}, {os.cpu_count()} cores", flush=True)
    runs = {
        "plain": lambda: plain_loop(model_dir, ds.examples, tok.pad_token_id, args.steps, args.micro, args.accum, lr),
        "recipe_in_process": lambda: recipe(args.model, args.data, args.steps, args.micro, args.accum, lr, args.max_seq_len, in_process=True),
        "recipe": lambda: recipe(args.model, args.data, args.steps, args.micro, args.accum, lr, args.max_seq_len),
    }
    rounds = []
    for i in range(args.repeats):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        r = {name: runs[name]() for name in order}
        r |= {"order": order, "ratio": r["recipe"]["tokens_per_s"] / r["plain"]["tokens_per_s"],
              "recipe_in_process_ratio": r["recipe_in_process"]["tokens_per_s"] / r["plain"]["tokens_per_s"]}
        rounds.append(r)
        print(f"round {i + 1}/{args.repeats} ({', '.join(order)}): Ray Train recipe / plain {r['ratio']:.3f}, "
              f"in process / plain {r['recipe_in_process_ratio']:.3f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    local_ratio = statistics.median(r["recipe_in_process_ratio"] for r in rounds)
    mid = min(rounds, key=lambda r: abs(r["ratio"] - ratio))  # the round whose ratio is the median
    plain, local, ray_recipe = mid["plain"], mid["recipe_in_process"], mid["recipe"]

    print(f"\n{'round':>5} {'plain tok/s':>11} {'in process':>10} {'Ray Train':>10} {'in proc / plain':>15} {'Ray / plain':>11}")
    for i, r in enumerate(rounds, 1):
        print(f"{i:>5} {r['plain']['tokens_per_s']:>11.1f} {r['recipe_in_process']['tokens_per_s']:>10.1f} "
              f"{r['recipe']['tokens_per_s']:>10.1f} {r['recipe_in_process_ratio']:>15.3f} {r['ratio']:>11.3f}")
    print(f"\nthe median round ({rounds.index(mid) + 1}):")
    print(f"{'':30}{'tokens/s':>10}{'wall s':>9}{'final loss':>12}{'/ plain':>9}")
    for name, r in (("plain PyTorch loop", plain), ("recipe in process (no Ray)", local), ("Ray Train recipe (1 worker)", ray_recipe)):
        print(f"{name:30}{r['tokens_per_s']:>10.1f}{r['wall_s']:>9.1f}{r['final_loss']:>12.4f}{r['tokens_per_s'] / plain['tokens_per_s']:>9.3f}")
    print()
    print_shares("CPU by process over the Ray Train recipe's steady-state steps", ray_recipe["cpu_share_by_process"])
    print(f"\nratio recipe/plain, median of {len(rounds)} rounds: {ratio:.3f} (target >= 0.95); in process {local_ratio:.3f}")
    out = ROOT / "bench" / "results" / "sft_overhead.json"
    earlier = json.loads(out.read_text()) if out.exists() else {}
    other = earlier.pop("other_runs", [])
    if "ratio" in earlier:  # the previous headline joins the earlier runs
        other.append({"ratio": earlier["ratio"], "recipe_in_process_ratio": earlier.get("recipe_in_process_ratio"),
                      "plain_tokens_per_s": earlier.get("plain", {}).get("tokens_per_s"), "rounds": len(earlier.get("rounds", [])) or 1,
                      "note": "an earlier headline of this bench"})
    result = {
        "name": "sft_overhead", "model": args.model, "steps": args.steps, "micro_batch": args.micro, "accum": args.accum,
        "max_seq_len": args.max_seq_len, "cores": os.cpu_count(), "plain": plain, "recipe": ray_recipe, "recipe_in_process": local,
        "recipe_in_process_ratio": local_ratio, "ratio": ratio, "target": 0.95,
        "rounds": rounds, "other_runs": other,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
