"""rayapp against TRL on the same work, in one run: SFT supervised tokens/s and GRPO seconds per iteration.

TRL is not a rayapp dependency: `make bench-trl-env` installs trl==1.16.0 alone (its own
dependencies are in .venv already) into bench/.trl, which only this script puts on sys.path.

1. SFT: the same model (``--model``, smollm2-135m-instruct), the same tokenized chat examples
   (data/sft_chat/train.jsonl rendered and masked by rayapp), the same batches in the same order
   (global 8 = micro 4 x 2 accumulation, rayapp's seeded order), ``--max-seq-len``, steps, AdamW
   at a constant learning rate, gradient clipping at 1, fp32, no packing, padding to the longest
   in the micro-batch. rayapp: ``rayapp.training.sft.run`` with one Ray Train worker (as
   bench/sft_overhead.py). TRL: ``SFTTrainer`` given the same token ids with ``completion_mask``
   (``completion_only_loss``), so both supervise exactly the same tokens (checked: the counts per
   step are compared, and the losses agree step by step); TRL's CPU defaults that would change the
   work (bf16 autocast, gradient checkpointing) are turned off. Supervised tokens/s.
2. GRPO: the same policy (``--policy tiny-sft``: the ``tiny:layers=4,hidden=128`` Llama after
   ``--policy-sft-steps`` of SFT on worked chain_sum answers, as bench/rl_iteration.py, cached
   under outputs/bench_vs_trl; or a model used as is), the same RL prompts in the same order, group
   size (``--n``), prompts per iteration, max completion length, sampling at temperature 1, reward
   (rayapp's exact_match, called by both), one update epoch, optimizer steps of half an
   iteration's rollouts in micro-batches of a quarter, old log-probs recomputed by the trainer, no
   KL term (no reference model), token-level loss normalised over the optimizer step's tokens
   (TRL ``loss_type: dapo``). rayapp: ``kind: rlhf`` (jobs/rlhf_grpo.yaml) with its vLLM CPU
   engine (``engine.cpu_threads_bind: all``) and ``--rl-workers`` Ray Train workers. TRL:
   ``GRPOTrainer`` on CPU generating with transformers ``generate`` (``use_vllm: false``).
   Seconds per iteration (generate, score, update, and for rayapp the weight sync into the engine).

Both sides are timed the same way, steady state (the first step or iteration excluded): the
interval between the end of one step (iteration) and the end of the next, which holds everything
each framework does per step. For rayapp the driver timestamps each new metrics.jsonl row; for TRL
a callback fires at the end of each optimizer step. The median interval is reported, with the
mean and the best (least disturbed) step beside it, and the 1-minute load average before and
after each side: on a machine shared with other jobs steps stall for seconds, and the two sides
run one after the other, so each meets a different load. Ray starts its
workers at nice 15, which on a busy machine starves them against TRL's loop at nice 0, so the
bench starts Ray with ``RAY_worker_niceness=0``; Ray is shut down before TRL runs.

    make bench-trl-env && .venv/bin/python bench/vs_trl.py [--sft-steps-bench 12] [--iterations 10] [--policy tiny-sft]

Writes bench/results/vs_trl.json with {"ratio": TRL s/iter / rayapp s/iter (GRPO, medians),
"target": 2.0, "ratio_best_iterations"} and the SFT pair beside it
(``sft.ratio_rayapp_over_trl_tokens_per_s``, goal >= 1.0, and ``sft.ratio_best_steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_DIR = ROOT / "bench" / ".trl"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rayapp.data.readers import read_jsonl, write_jsonl_atomic  # noqa: E402


def import_trl():
    """TRL from bench/.trl (never from rayapp's own environment)."""
    if not (TRL_DIR / "trl").is_dir():
        raise SystemExit(f"TRL is not installed in {TRL_DIR}: run `make bench-trl-env` first")
    sys.path.insert(0, str(TRL_DIR))
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    import trl

    return trl


class RowWatcher:
    """Timestamps each new row of a metrics.jsonl another process appends to (polled every 5 ms):
    the end of each step as seen from outside, the same clock TRL's callback reads."""

    def __init__(self, path: Path):
        self.path, self.times, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    n = f.read().count(b"\n")
            except FileNotFoundError:
                n = 0
            now = time.perf_counter()
            self.times.extend([now] * (n - seen))
            seen = max(seen, n)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def step_clock(trl_callback_base, every: int = 1):
    """A TrainerCallback recording perf_counter at every ``every``-th optimizer step's end."""

    class Clock(trl_callback_base):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every == 0:
                self.times.append(time.perf_counter())

    return Clock()


# -- SFT ----------------------------------------------------------------------------------------
def sft_rayapp(model_ref: str, train_path: str, steps: int, micro: int, accum: int, lr: float, max_seq_len: int) -> dict:
    from rayapp.config import load_job_dict
    from rayapp.training.sft import run

    out = Path(tempfile.mkdtemp(prefix="bench-vstrl-sft-"))
    cfg = load_job_dict({
        "kind": "sft", "name": "bench_vs_trl_sft",
        "model": {"path": model_ref, "max_seq_len": max_seq_len},
        "data": {"train": train_path},
        "train": {"max_steps": steps, "global_batch_size": micro * accum, "micro_batch_size": micro, "learning_rate": lr,
                  "warmup_ratio": 0, "min_lr_ratio": 1.0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                  "checkpoint_every": 10_000, "eval_every": 10_000, "log_every": 1},
        "resources": {"num_workers": 1},
        "output_dir": str(out),
    })
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with RowWatcher(out / "metrics.jsonl") as watch:
        run(cfg)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    dts = intervals(watch.times)  # dts[k-1]: end of step k to end of step k+1
    rates = [r["units"] / dt for r, dt in zip(rows[1:], dts, strict=True)]
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_mean": statistics.mean(rates), "tokens_per_s_best": max(rates),
            "tokens_per_s_in_step": statistics.median(r["units_per_s"] for r in rows[1:]), "load_1min": [load0, os.getloadavg()[0]],
            "step_s": statistics.median(dts), "per_step_s": [round(x, 3) for x in dts], "wall_s": wall, "final_loss": rows[-1]["loss"], "tokens_per_step": [r["units"] for r in rows]}


def sft_trl(model_dir: str, examples: list, pad_id: int, steps: int, micro: int, accum: int, lr: float, max_seq_len: int) -> dict:
    trl = import_trl()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from rayapp.algorithms import IGNORE_INDEX
    from rayapp.models.io import load_causal_lm, load_tokenizer
    from rayapp.training.loop import global_batch_indices

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)  # what rayapp's single worker sets
    order = [i for s in range(steps) for i in global_batch_indices(s, len(examples), micro * accum, seed=0)]
    data = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(x != IGNORE_INDEX) for x in e.labels]} for e in examples])
    counted: list[int] = []

    class SameOrderSFT(trl.SFTTrainer):
        def _get_train_sampler(self, dataset=None):
            return order  # rayapp's batches, in rayapp's order

    out = tempfile.mkdtemp(prefix="bench-vstrl-trl-sft-")
    args = trl.SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, gradient_checkpointing=False, packing=False, completion_only_loss=True,
        max_length=max_seq_len, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=True,
    )
    tok = load_tokenizer(model_dir)
    trainer = SameOrderSFT(model=load_causal_lm(model_dir), args=args, train_dataset=data, processing_class=tok)
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counted.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch

    trainer.data_collator = counting_collator
    clock = step_clock(TrainerCallback)
    trainer.add_callback(clock)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    trainer.train()
    wall = time.perf_counter() - t0
    per_step = [sum(counted[k * accum : (k + 1) * accum]) for k in range(steps)]
    dts = intervals(clock.times)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out, ignore_errors=True)
    rates = [n / dt for n, dt in zip(per_step[1:], dts, strict=True)]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_mean": statistics.mean(rates), "tokens_per_s_best": max(rates),
            "load_1min": [load0, os.getloadavg()[0]], "step_s": statistics.median(dts),
            "per_step_s": [round(x, 3) for x in dts], "wall_s": wall, "final_loss": losses[-1] if losses else float("nan"), "tokens_per_step": per_step}


# -- GRPO ---------------------------------------------------------------------------------------
def grpo_policy(args, work: Path):
    """(policy directory, RL prompts, SFT seconds, description): ``--policy tiny-sft`` is the tiny
    Llama SFT'd on worked chain_sum answers (bench/rl_iteration.py's), any other value a model used
    as is. The prompts are rl_iteration.py's RL prompts."""
    import torch
    from distill_quality import train_teacher
    from rl_iteration import make_sets

    from rayapp.models.io import resolve_model

    sft_rows, rl_rows, _ = make_sets(args.policy_sft_rows, args.rl_prompts, 200)  # rl_iteration.py's sets
    prompts = [{"input_text": r["input_text"], "answer": r["gold"]} for r in rl_rows]
    if args.policy != "tiny-sft":
        return resolve_model(args.policy), prompts, 0.0, f"{args.policy} as is"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster on a shared machine (bench/rl_iteration.py)
    try:
        policy, sft_s = train_teacher(sft_rows, work / "sft", "tiny:layers=4,hidden=128", args.policy_sft_steps, 3e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    return policy, prompts, sft_s, f"tiny:layers=4,hidden=128 after {args.policy_sft_steps} SFT steps on chain_sum worked answers ({sft_s}s)"


def grpo_shapes(args) -> dict:
    rollouts = args.prompts_per_iteration * args.n
    return {"rollouts": rollouts, "global_batch": rollouts // 2, "micro": rollouts // 4}


def grpo_rayapp(policy: Path, prompts: list[dict], args, work: Path) -> dict:
    from rayapp.config import load_job
    from rayapp.training import rlhf

    shape = grpo_shapes(args)
    out = work / "rayapp_grpo"
    shutil.rmtree(out, ignore_errors=True)
    write_jsonl_atomic(work / "rl_train.jsonl", prompts)
    micro = shape["micro"]  # 2 micro-batches per optimizer step on 1 worker, 1 per rank on 2
    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", [
        f"model.path={policy}", "model.max_seq_len=128", f"data.train={work / 'rl_train.jsonl'}", "data.validation=null",
        "rl.rewards=[{function: exact_match}]", "rl.kl_coeff=0", "rl.eval_prompts=0", "rl.update_epochs=1",
        f"rl.iterations={args.iterations}", f"rl.prompts_per_iteration={args.prompts_per_iteration}",
        f"sampling={{temperature: 1.0, max_tokens: {args.max_completion}, n: {args.n}}}",
        f"train.learning_rate={args.rl_lr}", "train.max_grad_norm=1.0", "train.weight_decay=0.0",
        f"train.eval_every={10 * args.iterations}", f"train.checkpoint_every={10 * args.iterations}",
        f"train.global_batch_size={shape['global_batch']}", f"train.micro_batch_size={micro}",
        f"resources.num_workers={args.rl_workers}", f"engine.cpu_threads_bind={args.engine_bind}", f"output_dir={out}",
    ])
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with RowWatcher(out / "metrics.jsonl") as watch:
        rlhf.run(cfg)
    wall = time.perf_counter() - t0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward_mean" in r]
    dts = intervals(watch.times)
    split = {k: statistics.median(r[f"time_{k}_s"] for r in rows[1:]) for k in ("generate", "score", "train", "sync", "iteration")}
    return {"s_per_iter": statistics.median(dts), "s_per_iter_mean": statistics.mean(dts), "s_per_iter_best": min(dts),
            "load_1min": [load0, os.getloadavg()[0]], "s_per_iter_in_loop": split["iteration"], "per_iter_s": [round(x, 3) for x in dts],
            "time_split_s": split, "wall_s": wall, "reward_mean": [round(r["reward_mean"], 4) for r in rows],
            "completion_len": statistics.mean(r["response_len"] for r in rows), "workers": args.rl_workers, "micro_batch": micro}


def grpo_trl(policy: Path, prompts: list[dict], args) -> dict:
    trl = import_trl()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from rayapp.config.rl import RewardSpec
    from rayapp.models.io import load_causal_lm, load_tokenizer
    from rayapp.rewards import build_reward
    from rayapp.training.loop import global_batch_indices

    shape = grpo_shapes(args)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    reward = build_reward([RewardSpec(function="exact_match")])  # what rayapp scores with
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["input_text"]}], "answer": p["answer"]} for p in prompts])
    steps_per_gen = shape["rollouts"] // shape["micro"]  # micro-batches per iteration (4)
    accum = shape["global_batch"] // shape["micro"]  # 2 optimizer steps per iteration
    order = []
    for it in range(args.iterations):  # rayapp's prompts of each iteration, each n times, the block once per micro-step
        block = [i for i in global_batch_indices(it, len(prompts), args.prompts_per_iteration, 0) for _ in range(args.n)]
        order += block * steps_per_gen
    lengths: list[float] = []

    def exact_match(prompts, completions, answer, **kw):
        scores = [reward(c[0]["content"] if isinstance(c, list) else c, {"answer": a, "prompt": ""})[0]
                  for c, a in zip(completions, answer, strict=True)]
        return scores

    class SameOrderGRPO(trl.GRPOTrainer):
        def _get_train_sampler(self, dataset=None):
            return order

    out = tempfile.mkdtemp(prefix="bench-vstrl-trl-grpo-")
    cfg = trl.GRPOConfig(
        output_dir=out, max_steps=args.iterations * accum, per_device_train_batch_size=shape["micro"],
        gradient_accumulation_steps=accum, steps_per_generation=steps_per_gen, num_generations=args.n,
        max_completion_length=args.max_completion, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=args.rl_lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=False, gradient_checkpointing=False,
        disable_dropout=True, use_vllm=False, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=True, log_completions=False, shuffle_dataset=False,
    )
    tok = load_tokenizer(str(policy))
    trainer = SameOrderGRPO(model=load_causal_lm(str(policy)), reward_funcs=[exact_match], args=cfg, train_dataset=data,
                            processing_class=tok)
    clock = step_clock(TrainerCallback, every=accum)
    trainer.add_callback(clock)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "reward" in h]
    lengths = [h["completions/mean_length"] for h in hist if "completions/mean_length" in h]
    dts = intervals(clock.times)
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_iter": statistics.median(dts), "s_per_iter_mean": statistics.mean(dts), "s_per_iter_best": min(dts),
            "load_1min": [load0, os.getloadavg()[0]], "per_iter_s": [round(x, 3) for x in dts], "wall_s": wall,
            "reward_mean": [round(h["reward"], 4) for h in hist][::accum],
            "completion_len": statistics.mean(lengths) if lengths else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="SFT pair: model")
    ap.add_argument("--data", default=str(ROOT / "data/sft_chat/train.jsonl"), help="SFT pair: chat data")
    ap.add_argument("--sft-steps-bench", type=int, default=12, help="SFT pair: optimizer steps on each side")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5, help="SFT pair: learning rate")
    ap.add_argument("--iterations", type=int, default=10, help="GRPO pair: iterations on each side")
    ap.add_argument("--n", type=int, default=8, help="GRPO group size (num_generations)")
    ap.add_argument("--prompts-per-iteration", type=int, default=8)
    ap.add_argument("--max-completion", type=int, default=32, help="GRPO max completion tokens")
    ap.add_argument("--rl-lr", type=float, default=5e-5)
    ap.add_argument("--rl-workers", type=int, default=1, help="rayapp's Ray Train workers for GRPO")
    ap.add_argument("--engine-bind", default="all", help="rayapp's engine.cpu_threads_bind ('all': the model's threads on every core, "
                    "as TRL's generate; 'auto': vLLM's default, one core on a 2-core machine)")
    ap.add_argument("--rl-prompts", type=int, default=1000)
    ap.add_argument("--policy", default="tiny-sft", help="GRPO policy: tiny-sft (SFT'd tiny Llama) or a model reference used as is")
    ap.add_argument("--policy-sft-steps", type=int, default=400, help="SFT steps that make the GRPO policy (cached)")
    ap.add_argument("--policy-sft-rows", type=int, default=1000)
    ap.add_argument("--only", choices=["sft", "grpo"], default=None, help="run one pair only (development)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_vs_trl"))
    args = ap.parse_args()

    # Ray starts its workers at nice 15 (RAY_worker_niceness): on a machine where anything else runs,
    # that alone starves rayapp's train workers and engine against TRL's loop in this nice-0
    # process. Both sides run at the same priority here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    from rayapp.config.base import DataConfig
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_tokenizer, resolve_model

    trl = import_trl()
    import torch
    import transformers

    work = Path(args.work)
    started = time.perf_counter()
    result: dict = {"name": "vs_trl", "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "trl": trl.__version__, "transformers": transformers.__version__,
                    "torch": torch.__version__}
    if args.only in (None, "sft"):
        model_dir = str(resolve_model(args.model))
        tok = load_tokenizer(model_dir)
        ds = load_sft_dataset(args.data, tok, DataConfig(train=args.data), args.max_seq_len)
        print(f"SFT: {args.model}, {len(ds.examples)} examples, {args.sft_steps_bench} steps of {args.micro}x{args.accum}, "
              f"max_seq_len {args.max_seq_len}, {os.cpu_count()} cores", flush=True)
        ours = sft_rayapp(args.model, args.data, args.sft_steps_bench, args.micro, args.accum, args.lr, args.max_seq_len)
        ray.shutdown()
        theirs = sft_trl(model_dir, ds.examples, tok.pad_token_id, args.sft_steps_bench, args.micro, args.accum, args.lr, args.max_seq_len)
        same = ours["tokens_per_step"] == theirs["tokens_per_step"]
        result["sft"] = {"model": args.model, "steps": args.sft_steps_bench, "micro_batch": args.micro, "accum": args.accum,
                         "max_seq_len": args.max_seq_len, "lr": args.lr, "rayapp": ours, "trl": theirs,
                         "same_supervised_tokens_per_step": same,
                         "ratio_rayapp_over_trl_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                         "ratio_best_steps": ours["tokens_per_s_best"] / theirs["tokens_per_s_best"], "goal": 1.0}
        print(f"\n{'SFT (median of steps 2..)':30}{'tokens/s':>10}{'best':>8}{'s/step':>9}{'wall s':>9}{'final loss':>12}{'load 1m':>12}")
        for name, r in (("rayapp sft recipe (1 worker)", ours), (f"TRL {trl.__version__} SFTTrainer", theirs)):
            print(f"{name:30}{r['tokens_per_s']:>10.1f}{r['tokens_per_s_best']:>8.1f}{r['step_s']:>9.2f}{r['wall_s']:>9.1f}"
                  f"{r['final_loss']:>12.4f}{r['load_1min'][0]:>6.1f}{r['load_1min'][1]:>6.1f}")
        print(f"supervised tokens per step identical on both sides: {same}; "
              f"rayapp/TRL tokens/s {result['sft']['ratio_rayapp_over_trl_tokens_per_s']:.3f} (goal >= 1.0); "
              f"of the best steps: {result['sft']['ratio_best_steps']:.3f}", flush=True)
    if args.only in (None, "grpo"):
        policy, prompts, sft_s, described = grpo_policy(args, work)
        shape = grpo_shapes(args)
        print(f"\nGRPO: policy {described}, {args.iterations} iterations x "
              f"{args.prompts_per_iteration} prompts x n {args.n}, max {args.max_completion} completion tokens, "
              f"optimizer steps of {shape['global_batch']} rollouts", flush=True)
        from rayapp.runtime import ensure_ray

        ensure_ray()
        ours = grpo_rayapp(policy, prompts, args, work)
        ray.shutdown()
        theirs = grpo_trl(policy, prompts, args)
        result["grpo"] = {"policy": described,
                          "iterations": args.iterations, "prompts_per_iteration": args.prompts_per_iteration, "n": args.n,
                          "max_completion": args.max_completion, "lr": args.rl_lr, **{f"{k}_rollouts": v for k, v in shape.items()},
                          "rayapp": ours, "trl": theirs}
        print(f"\n{'GRPO (median of iterations 2..)':34}{'s/iter':>8}{'best':>7}{'wall s':>9}{'compl len':>10}{'load 1m':>12}")
        for name, r in ((f"rayapp rlhf (vLLM, {args.rl_workers} worker)", ours), (f"TRL {trl.__version__} GRPOTrainer (CPU)", theirs)):
            print(f"{name:34}{r['s_per_iter']:>8.2f}{r['s_per_iter_best']:>7.2f}{r['wall_s']:>9.1f}{r['completion_len']:>10.1f}"
                  f"{r['load_1min'][0]:>6.1f}{r['load_1min'][1]:>6.1f}")
        print("rayapp iteration split: " + ", ".join(f"{k} {v:.2f}s" for k, v in ours["time_split_s"].items()))
        result["ratio"] = theirs["s_per_iter"] / ours["s_per_iter"]
        result["ratio_best_iterations"] = theirs["s_per_iter_best"] / ours["s_per_iter_best"]
        print(f"ratio TRL/rayapp s per GRPO iteration: {result['ratio']:.2f} (target 2.0); "
              f"of the best iterations: {result['ratio_best_iterations']:.2f}")
    result["target"] = 2.0
    result["metric"] = "GRPO seconds per iteration, TRL GRPOTrainer (CPU, transformers generate) / rayapp kind: rlhf (vLLM CPU engine); sft: supervised tokens/s"
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_at_end"] = os.getloadavg()
    dest = ROOT / "bench" / "results" / ("vs_trl.json" if args.only is None else f"vs_trl_{args.only}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {result['total_seconds']:.0f}s; wrote {dest}")


if __name__ == "__main__":
    main()
