"""Sequence packing (train.packing) against padding, side by side in one run.

One model (one process) takes optimizer steps on the same examples as the step loop orders them,
each micro-batch once padded to its longest example (collate_sft) and once packed into rows of up
to max_seq_len tokens (collate_packed), the two in alternating order, with the recipe's loss
(sft_loss). Each pair's time ratio cancels the machine's drift (this machine is shared); the
median pair is the headline, tokens/s = supervised tokens / seconds over all pairs (the first,
warm-up pair excluded).

Two datasets, the uneven kinds packing is for:
- demo: distilling step-by-step rows as in `make demo` (chain_sum questions; each asked as the
  label task, a few tokens of answer, and as the rationale task, a worked rationale), built with
  the method's own data code from gold rationales, which stand in for the teacher's;
- chat: data/sft_chat/train.jsonl (multi-turn chat rows, loss on the assistant turns).

    .venv/bin/python bench/packing.py [--model smollm2-135m-instruct] [--steps 8] [--micro 8]

Writes bench/results/packing.json: {"ratio": the smaller of the two packed/padded tokens/s
ratios, "target": 1.5}, with each dataset's numbers and its padding share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.5


def demo_items(tokenizer, max_seq_len: int, n: int, out: Path) -> list:
    """step_by_step items (both tasks) for ``n`` chain_sum questions with gold rationales."""
    from rayapp.config import load_job_dict
    from rayapp.data.dataset import build_rows
    from rayapp.training.distill.step_by_step import build_data

    ds = load_job_dict({"kind": "dataset", "dataset": "chain_sum", "options": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
                        "sizes": {"train": n, "unlabeled": 0, "test": 0}, "seed": 0, "output_dir": str(out / "data")})
    rows = build_rows(ds)["train"]
    path = out / "teacher_outputs.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"input_text": r["input_text"], "label": r["output_text"], "rationale": r["rationale"],
                                "teacher": {"model": "gold", "template": "chain_sum", "sampling": {}}}) + "\n")
    cfg = load_job_dict({"kind": "distill", "method": "step_by_step", "task_type": "number", "model": {"path": "tiny", "max_seq_len": max_seq_len},
                         "teacher": {"outputs": str(path)}, "step_by_step": {"rationale_weight": 0.2}, "output_dir": str(out / "distill")})
    return build_data(cfg, tokenizer, out / "distill").train


def chat_items(tokenizer, max_seq_len: int) -> list:
    from rayapp.config.base import DataConfig
    from rayapp.data.sft import load_sft_dataset

    data = ROOT / "data/sft_chat/train.jsonl"
    return load_sft_dataset(data, tokenizer, DataConfig(train=str(data)), max_seq_len).examples


def timed_step(model, opt, batch, count: int) -> float:
    """Seconds of one optimizer step on ``batch`` (forward, backward, AdamW) as the loop takes it:
    the loss is the step's supervised-token mean."""
    from rayapp.training.sft import sft_loss

    t0 = time.perf_counter()
    parts = sft_loss(model, batch)
    (parts.loss_sum / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def computed_share(items: list, collate, steps: int, micro: int) -> float:
    """Share of the computed token positions that are padding, over the batches the runs see."""
    from rayapp.training.loop import global_batch_indices

    pad = total = 0
    for step in range(steps):
        idx = global_batch_indices(step, len(items), micro, seed=0)
        ids = collate([items[i] for i in idx])["input_ids"]
        seg = collate([items[i] for i in idx]).get("segment_ids")
        total += ids.numel()
        pad += int((seg < 0).sum()) if seg is not None else ids.numel() - sum(len(items[i].input_ids) for i in idx)
    return pad / total


def measure(name: str, model, items: list, pad_id: int, max_seq_len: int, steps: int, micro: int, out: Path) -> dict:
    """``steps`` pairs of optimizer steps, one padded and one packed on the same examples, in
    alternating order; a pair's ratio cancels the machine's drift, the median pair is reported."""
    import torch

    from rayapp.data.collate import collate_sft
    from rayapp.data.packing import check_packing_honoured, collate_packed
    from rayapp.training.loop import count_supervised, global_batch_indices

    check_packing_honoured(model)
    ways = {"padded": lambda b: collate_sft(b, pad_id), "packed": lambda b: collate_packed(b, pad_id, max_seq_len)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    times: dict[str, list[float]] = {k: [] for k in ways}
    tokens = []
    for step in range(steps + 1):  # step 0 warms both paths up and is not counted
        idx = global_batch_indices(step, len(items), micro, seed=0)
        batch_items = [items[i] for i in idx]
        count = count_supervised(ways["padded"](batch_items))
        order = list(ways) if step % 2 == 0 else list(reversed(ways))
        for way in order:
            batch = ways[way](batch_items)
            assert count_supervised(batch) == count
            dt = timed_step(model, opt, batch, count)
            if step:
                times[way].append(dt)
        if step:
            tokens.append(count)
            print(f"  {name} step {step}: padded {times['padded'][-1]:.2f} s, packed {times['packed'][-1]:.2f} s", flush=True)
    pairs = sorted(p / q for p, q in zip(times["padded"], times["packed"], strict=True))
    res = {way: {"tokens_per_s": sum(tokens) / sum(ts), "step_s": statistics.mean(ts),
                 "padding_share": computed_share(items, ways[way], steps, micro)} for way, ts in times.items()}
    lengths = sorted(len(it.input_ids) for it in items)
    res["examples"], res["median_len"], res["max_len"] = len(items), lengths[len(lengths) // 2], lengths[-1]
    res["pair_ratios"] = [round(r, 3) for r in pairs]
    res["ratio"] = statistics.median(pairs)
    # What removing padding alone can give: computed positions padded / packed.
    res["ideal_ratio"] = (1 - res["packed"]["padding_share"]) / (1 - res["padded"]["padding_share"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()

    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = str(resolve_model(args.model))
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    out = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    datasets = {"demo": demo_items(tok, args.max_seq_len, 200, out), "chat": chat_items(tok, args.max_seq_len)}
    print(f"model {args.model}, {args.steps} pairs of steps of {args.micro} examples, "
          f"rows of up to {args.max_seq_len} tokens, {os.cpu_count()} cores", flush=True)
    results = {name: measure(name, model, items, tok.pad_token_id, args.max_seq_len, args.steps, args.micro, out)
               for name, items in datasets.items()}

    print(f"\n{'data':8}{'examples':>9}{'median/max len':>16}{'padded tok/s':>14}{'packed tok/s':>14}{'padding padded/packed':>23}"
          f"{'ideal':>7}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:8}{r['examples']:>9}{r['median_len']:>9}/{r['max_len']:<6}{r['padded']['tokens_per_s']:>14.1f}"
              f"{r['packed']['tokens_per_s']:>14.1f}{r['padded']['padding_share']:>14.0%} / {r['packed']['padding_share']:<6.0%}"
              f"{r['ideal_ratio']:>7.2f}{r['ratio']:>8.2f}")
    ratio = min(r["ratio"] for r in results.values())
    print(f"\nratio packed/padded (median step pair; the smaller of the two datasets): {ratio:.2f} (target >= {TARGET}); "
          "ideal = computed positions padded / packed, what removing padding alone can give")
    result = {"name": "packing", "model": args.model, "steps": args.steps, "micro_batch": args.micro,
              "load_average_1m_at_end": os.getloadavg()[0],
              "max_seq_len": args.max_seq_len, "cores": os.cpu_count(), "datasets": results, "ratio": ratio, "target": TARGET}
    path = ROOT / "bench" / "results" / "packing.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
