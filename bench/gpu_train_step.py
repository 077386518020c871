"""Training-step throughput on one device through rayapp's own step loop
(:func:`rayapp.training.loop.fit`, as every recipe runs it, in a single process): the process group
from ``process_group_backend`` (world size 1; ``cpu:gloo,cuda:nccl`` on a GPU, so the loop's CPU
all-reduces of token counts and metric sums go to gloo and CUDA tensors to NCCL), FSDP2, bf16-mixed
and activation checkpointing (:func:`rayapp.training.parallel.prepare_model`), on randomly initialised
models of SmolLM2-135M's and Qwen2.5-0.5B's shapes (configs below, nothing downloaded).

Needs only torch and transformers (no ray, vllm, peft or pydantic), so it runs on a bare GPU machine
with this repository copied over:

    python bench/gpu_train_step.py --device cuda [--steps 20] [--seq-len 2048] [--batch 4]
    python bench/gpu_train_step.py --device cpu --steps 2 --seq-len 32 --batch 1 --models smollm2-135m

One step is the loop's: forward of each micro-batch, float32 cross-entropy summed over tokens and
divided by the step's all-reduced token count, backward, clip_grad_norm (the global norm), AdamW
step and LR schedule, metrics all-reduced. The first step (allocations, kernel selection) is a
warm-up and not timed.

MFU = achieved model FLOP/s / peak. Model FLOPs per token are 6*P_matmul + 12*L*s*h_attn (PaLM,
appendix B: weight matmuls forward and backward, plus attention scores and values; the causal mask's
half is not subtracted); the recompute of activation checkpointing is not counted, as usual. The
peak is the device's dense bf16 rate: 989 TFLOP/s for an H100/H200 SXM by default on CUDA
(--peak-tflops to change it); on CPU MFU is shown only when --peak-tflops is given.

Prints a table and writes bench/results/gpu_train_step.json (--out), with ``ratio`` = MFU of the
last model measured on CUDA and ``target`` = 0.40, the MFU `rayapp plan` assumes for GPU-hours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rayapp.training import loop, parallel  # noqa: E402  (torch only)

PLAN_MFU = 0.40  # rayapp.plan.DEFAULT_MFU: what `rayapp plan` assumes for GPU-hours
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16

# Published config.json values of the two models (HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B).
MODELS = {
    "smollm2-135m": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}


def build(name: str, seed: int, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, cfg = MODELS[name]
    if layers is not None:
        cfg = {**cfg, "num_hidden_layers": layers}
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(seed)
    return model_cls(config_cls(**cfg))


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    matmul = params - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)  # a lookup is no matmul
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 6 * matmul + 12 * c.num_hidden_layers * seq_len * c.num_attention_heads * head_dim


def init_group(device: torch.device) -> str:
    backend = parallel.process_group_backend(device.type)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return backend


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux; the process's max RSS


@dataclass
class StepConfig:
    """The ``train:`` settings the loop reads (the fields of rayapp.config.base.TrainConfig that
    fit uses, without pydantic): a constant learning rate, global gradient clipping, no
    evaluation or checkpoints."""

    global_batch_size: int
    max_steps: int
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 1.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 1 << 30
    checkpoint_every: int = 1 << 30
    log_every: int = 1
    seed: int = 0
    epochs: float = 1.0

    @property
    def peak_lr(self) -> float:
        return self.learning_rate


def token_loss(model, batch) -> loop.LossParts:
    """The loop's loss_fn: next-token cross-entropy summed over the tokens, in float32 (the root
    casts its output back under bf16-mixed)."""
    logits = model(input_ids=batch["input_ids"]).logits
    loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                 batch["targets"].reshape(-1), reduction="sum")
    return loop.LossParts(loss_sum=loss_sum, count=batch["targets"].numel())


def run_model(name: str, args, device: torch.device) -> dict:
    model = build(name, args.seed, args.layers)
    params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, args.seq_len)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = parallel.prepare_model(model, "fsdp", device, args.precision, activation_checkpointing=not args.no_ac)
    g = torch.Generator().manual_seed(args.seed)
    vocab = MODELS[name][1]["vocab_size"]
    sequences = list(torch.randint(0, vocab, (args.batch * args.steps, args.seq_len + 1), generator=g))

    def collate(rows: list[torch.Tensor]) -> dict:
        ids = torch.stack(rows)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    cfg = StepConfig(global_batch_size=args.batch, max_steps=args.steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        loop.fit(model=model, train_items=sequences, val_items=None, collate=collate,
                 count_fn=lambda b: b["targets"].numel(), loss_fn=token_loss, cfg=cfg,
                 micro_batch_size=args.micro_batch or args.batch, reporter=loop.LocalReporter(), metrics_path=metrics,
                 name=name, device=device)
        with open(metrics) as f:
            rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows]
    norms = [r["grad_norm"] for r in rows]
    times = [r["step_time_s"] for r in rows]
    timed = times[1:] or times  # the first step warms up
    step_s = sum(timed) / len(timed)
    tokens = args.batch * args.seq_len
    tflops = fpt * tokens / step_s / 1e12
    peak = args.peak_tflops if args.peak_tflops is not None else (DEFAULT_PEAK_TFLOPS if device.type == "cuda" else None)
    out = {
        "model": name if args.layers is None else f"{name}[L={args.layers}]", "params": params,
        "layers": model.config.num_hidden_layers, "strategy": "fsdp", "precision": args.precision,
        "activation_checkpointing": not args.no_ac, "batch": args.batch, "micro_batch": args.micro_batch or args.batch,
        "seq_len": args.seq_len, "steps": args.steps, "timed_steps": len(timed), "step_s": step_s,
        "tokens_per_s": tokens / step_s, "model_tflops_per_token": fpt / 1e12, "achieved_tflops": tflops,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "losses": losses, "grad_norms": norms, "loop": "rayapp.training.loop.fit",
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    del model
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'model':<18} {'params':>8} {'precision':<10} {'AC':<3} {'batch x seq':>11} {'tokens/s':>10} "
            f"{'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} loss first -> last")
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"{r['model']:<18} {r['params'] / 1e6:>7.1f}M {r['precision']:<10} {'on' if r['activation_checkpointing'] else 'off':<3} "
            f"{r['batch']:>4} x {r['seq_len']:<5}{r['tokens_per_s']:>10.0f} {1000 * r['step_s']:>9.1f} "
            f"{r['achieved_tflops']:>8.2f} {mfu:>6} {r['peak_memory_gib']:>9.2f} "
            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per model; the first is not timed")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward/backward (default: --batch, no accumulation)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers instead of the model's own (a quick CPU check; the table marks it [L=N])")
    ap.add_argument("--precision", choices=list(parallel.PRECISIONS), default="bf16-mixed")
    ap.add_argument("--no-ac", action="store_true", help="turn activation checkpointing off")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"device peak dense bf16 TFLOP/s for MFU (default {DEFAULT_PEAK_TFLOPS:g} on CUDA, none on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_train_step.json"))
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.micro_batch and args.batch % args.micro_batch:
        ap.error(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    backend = init_group(device)
    try:
        rows = [run_model(name, args, device) for name in args.models]
    finally:
        dist.destroy_process_group()
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({gpu}), process group {backend!r} (world size 1), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(table(rows))
    cuda_rows = [r for r in rows if r["mfu"] is not None and device.type == "cuda"]
    result = {
        "name": "gpu_train_step", "device": str(device), "device_name": gpu, "backend": backend, "world_size": 1,
        "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
        "ratio": cuda_rows[-1]["mfu"] if cuda_rows else None, "ratio_is": f"MFU of {cuda_rows[-1]['model']}" if cuda_rows
        else "no CUDA run: MFU not measured", "target": PLAN_MFU,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if any(not math.isfinite(x) for r in rows for x in r["losses"]):
        raise SystemExit("a loss was not finite: see the table")
    return result


if __name__ == "__main__":
    main()
