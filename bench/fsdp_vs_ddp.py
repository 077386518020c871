"""DDP vs FSDP2 on 2 CPU workers: the same training, a fraction of the memory per worker.

Two processes form a gloo process group (torch.multiprocessing, as tests/unit/test_loop_distributed.py
does; no Ray) and train the same model twice, once per strategy, through rayapp's own code:
``rayapp.training.parallel.prepare_model(model, "ddp" | "fsdp", "cpu", "fp32")`` and the shared step loop
``rayapp.training.loop.fit`` (AdamW, LR schedule, global-token loss normalisation, gradient
accumulation, global-norm clipping), with the same seed, the same tokenized data
(data/sft_chat/train.jsonl with the tiny model's tokenizer) and the same number of steps (20).

What it measures:

- **Loss curves**: the per-step training loss of DDP and FSDP2 must agree within 1e-3 over the 20
  steps (both are fp32 and the same math; only the reduction order differs: DDP all-reduces a
  bucket, FSDP2 reduce-scatters per layer). Reports the max abs difference, also of the grad norm.
- **Bytes per worker** of parameters + gradients + AdamW state (exp_avg, exp_avg_sq, step), counted
  right after an optimizer step (a global optimizer step hook: the gradients still exist then)
  on each rank: under FSDP2 the rank's local shard of every DTensor (``.to_local()``), under DDP the
  full tensors. ``ratio`` = DDP bytes / FSDP2 bytes per worker (the larger rank of each), ``target``
  1.8 (2 workers: 2.0 is perfect sharding). Not counted: activations, and the parameters FSDP2
  gathers for the unit it is running (transient, one decoder layer at a time plus the root unit;
  their sizes are reported as ``fsdp_unit_bytes``).
- **Tokens/s** of each strategy: supervised tokens of both workers over the loop's step time,
  steps 2..N (the first step's allocations excluded). 2 ranks of 1 thread each on one machine:
  FSDP2 moves 1.5x DDP's bytes per step (all-gather in forward and backward, reduce-scatter) through
  gloo over loopback, so expect it to be slower here; on GPUs with NCCL that traffic overlaps compute.
  Timings are noisy when anything else runs on the machine.

    .venv/bin/python bench/fsdp_vs_ddp.py [--model tiny:layers=4,hidden=256] [--steps 20]

Prints a table and writes bench/results/fsdp_vs_ddp.json with {"ratio": DDP / FSDP2 bytes per
worker, "target": 1.8} and the details.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
STRATEGIES = ("ddp", "fsdp")
LOSS_TOL = 1e-3
TARGET = 1.8
GLOO_TIMEOUT_S = 300


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes this rank holds for ``t``: its shard for a DTensor, else the whole tensor."""
    if t is None:
        return 0
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        t = to_local()
    return t.numel() * t.element_size()


def memory_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())  # tied weights (embeddings / lm_head) once
    out = {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params),
        "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def unit_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Full (unsharded) parameter bytes of the FSDP2 units: the largest decoder layer and the root's own."""
    from rayapp.training.parallel import decoder_layers

    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    return {
        "largest_layer": max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers),
        "root": sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers),
    }


def train_config(args):
    from rayapp.config.base import TrainConfig

    return TrainConfig(max_steps=args.steps, global_batch_size=args.global_batch, micro_batch_size=args.micro,
                       learning_rate=args.lr, warmup_ratio=0.1, min_lr_ratio=0.1, max_grad_norm=1.0,
                       checkpoint_every=10_000, eval_every=10_000, log_every=1, seed=0)


def _rank_main(rank: int, world: int, port: int, out: str, model_dir: str, examples: list, pad_id: int, args) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from rayapp.data.collate import collate_sft
    from rayapp.models.io import load_causal_lm
    from rayapp.training.loop import LocalReporter, count_supervised, fit
    from rayapp.training.parallel import prepare_model
    from rayapp.training.sft import sft_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    results: dict = {}
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        model = load_causal_lm(model_dir)
        units = unit_bytes(model)
        model = prepare_model(model, strategy, "cpu", "fp32")
        seen: dict = {}

        def measure(optimizer, _args, _kwargs, model=model, seen=seen):
            seen.update(memory_breakdown(model, optimizer))  # after the step, before zero_grad: grads are there

        handle = register_optimizer_step_post_hook(measure)
        metrics = os.path.join(out, f"{strategy}.jsonl") if rank == 0 else None
        dist.barrier()
        t0 = time.perf_counter()
        fit(model=model, train_items=examples, val_items=None, collate=lambda items: collate_sft(items, pad_id),
            count_fn=count_supervised, loss_fn=sft_loss, cfg=train_config(args), micro_batch_size=args.micro,
            reporter=LocalReporter(), metrics_path=metrics, name=strategy)
        wall = time.perf_counter() - t0
        handle.remove()
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, seen)
        results[strategy] = {"bytes_per_rank": per_rank, "wall_s": wall, "unit_bytes": units}
        del model
    if rank == 0:
        (Path(out) / "ranks.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def summarise(strategy: str, rows: list[dict], res: dict) -> dict:
    timed = rows[1:]
    tokens = sum(r["units"] for r in timed)
    seconds = sum(r["step_time_s"] for r in timed)
    worst = max(res["bytes_per_rank"], key=lambda b: b["total"])
    return {
        "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
        "tokens_per_s": tokens / seconds, "timed_steps": len(timed), "wall_s": res["wall_s"],
        "bytes_per_worker": worst, "bytes_per_rank": res["bytes_per_rank"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:layers=4,hidden=256")
    ap.add_argument("--data", default=str(ROOT / "data/sft_chat/train.jsonl"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_vs_ddp.json"))
    args = ap.parse_args()

    from rayapp.config.base import DataConfig
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model

    model_dir = str(resolve_model(args.model))
    tok = load_tokenizer(model_dir)
    ds = load_sft_dataset(args.data, tok, DataConfig(train=args.data), args.max_seq_len)
    with open(Path(model_dir) / "config.json") as f:
        mcfg = json.load(f)
    n_params = sum(p.numel() for p in load_causal_lm(model_dir).parameters())
    print(f"model {args.model} ({n_params / 1e6:.2f}M params, {mcfg['num_hidden_layers']} layers, hidden "
          f"{mcfg['hidden_size']}), {len(ds.examples)} examples, {args.steps} steps of global batch {args.global_batch} "
          f"= micro {args.micro} x {WORLD} workers x {args.global_batch // (args.micro * WORLD)} accumulation, "
          f"{args.threads} thread(s) per worker, {os.cpu_count()} cores", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        mp.spawn(_rank_main, args=(WORLD, port, out, model_dir, ds.examples, tok.pad_token_id, args), nprocs=WORLD, join=True)
        total_wall = time.perf_counter() - t0
        ranks = json.loads((Path(out) / "ranks.json").read_text())
        runs = {}
        for strategy in STRATEGIES:
            rows = [json.loads(line) for line in open(Path(out) / f"{strategy}.jsonl")]
            assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), rows
            runs[strategy] = summarise(strategy, rows, ranks[strategy])

    ddp, fsdp = runs["ddp"], runs["fsdp"]
    loss_diff = max(abs(a - b) for a, b in zip(ddp["loss"], fsdp["loss"], strict=True))
    norm_diff = max(abs(a - b) for a, b in zip(ddp["grad_norm"], fsdp["grad_norm"], strict=True))
    ratio = ddp["bytes_per_worker"]["total"] / fsdp["bytes_per_worker"]["total"]

    mib = 1024**2
    print(f"\n{'per worker':12}{'params MiB':>12}{'grads MiB':>11}{'AdamW MiB':>11}{'total MiB':>11}{'tokens/s':>10}"
          f"{'loss 1':>9}{'loss N':>9}")
    for name, r in (("DDP", ddp), ("FSDP2", fsdp)):
        b = r["bytes_per_worker"]
        print(f"{name:12}{b['params'] / mib:>12.2f}{b['grads'] / mib:>11.2f}{b['optimizer'] / mib:>11.2f}"
              f"{b['total'] / mib:>11.2f}{r['tokens_per_s']:>10.0f}{r['loss'][0]:>9.4f}{r['loss'][-1]:>9.4f}")
    units = ranks["fsdp"]["unit_bytes"]
    print(f"\nloss curves, max |DDP - FSDP2| over {args.steps} steps: {loss_diff:.2e} (must be <= {LOSS_TOL:g}); "
          f"grad norm: {norm_diff:.2e}")
    print(f"FSDP2 gathers per unit (transient, not counted): largest layer {units['largest_layer'] / mib:.2f} MiB, "
          f"root {units['root'] / mib:.2f} MiB")
    print(f"ratio DDP/FSDP2 bytes per worker: {ratio:.3f} (target >= {TARGET}); tokens/s FSDP2/DDP "
          f"{fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}")

    result = {
        "name": "fsdp_vs_ddp", "ratio": ratio, "target": TARGET,
        "loss_max_abs_diff": loss_diff, "loss_tolerance": LOSS_TOL, "loss_within_tolerance": loss_diff <= LOSS_TOL,
        "grad_norm_max_abs_diff": norm_diff,
        "tokens_per_s": {"ddp": ddp["tokens_per_s"], "fsdp": fsdp["tokens_per_s"]},
        "bytes_per_worker": {"ddp": ddp["bytes_per_worker"], "fsdp": fsdp["bytes_per_worker"]},
        "fsdp_unit_bytes": units,
        "setup": {
            "model": args.model, "params": n_params, "layers": mcfg["num_hidden_layers"], "hidden": mcfg["hidden_size"],
            "data": os.path.relpath(args.data, ROOT), "examples": len(ds.examples), "max_seq_len": args.max_seq_len,
            "steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro, "workers": WORLD,
            "backend": "gloo", "precision": "fp32", "optimizer": "AdamW", "learning_rate": args.lr,
            "threads_per_worker": args.threads, "cores": os.cpu_count(), "torch": torch.__version__,
            "machine": platform.machine(), "wall_s": total_wall,
        },
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
