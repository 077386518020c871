"""README's benchmark table, regenerated from bench/results/*.json.

Every benchmark writes bench/results/NAME.json with at least {"ratio", "target"} for its headline
pair (higher is better for all of them); some add a second pair (below). This script writes one
row per result file between the README's ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->``
markers; what each run measured beyond the pair (settings, curves, profiles) stays in its JSON and
in docs/benchmarks.md.

    .venv/bin/python scripts/bench_table.py [--check]    # --check: exit 1 if README is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

# What each headline ratio is (the JSON's numbers fill in the rest).
HEADLINES = {
    "teacher_throughput": "vLLM actor pool / transformers `generate` tokens/s, 200 sampled CoT rationales",
    "distill_quality": "step-by-step / standard fine-tuning label accuracy at N=250, the demo's student",
    "opd_vs_sft": "training tokens SFT needs / on-policy distillation needs for the same accuracy (warm student)",
    "opd_vs_sft_cold": "the same from a student that starts untrained",
    "serve_load": "Ray Serve endpoint / the same vLLM engine called directly, tokens/s",
    "rl_iteration": "GRPO: greedy held-out exact match after / before",
    "sft_overhead": "Ray Train recipe / plain PyTorch loop, supervised tokens/s",
    "packing": "`train.packing` / padded batches, supervised tokens/s (the lower of demo and chat data)",
    "batch_scale": "`kind: batch` driver peak RSS at 100k rows / at 1M rows",
    "fsdp_vs_ddp": "per-worker memory of params + grads + AdamW, DDP / FSDP2 (2 workers)",
    "vs_trl": "TRL `GRPOTrainer` / rayapp seconds per GRPO iteration",
}


def second_pairs(name: str, d: dict) -> list[str]:
    """Second measured pairs a result carries, as 'what: measured (goal)'."""
    out = []
    if isinstance(d.get("vs_ray_data_llm"), dict):
        v = d["vs_ray_data_llm"]
        out.append(f"rayapp `kind: batch` / `ray.data.llm` rows/s: {v['ratio']:.2f} (>= {v['target']})")
    if "sync_share" in d:
        out.append(f"weight-sync share of an iteration: {d['sync_share']:.3f} (<= {d.get('sync_share_goal', 0.02)})")
    if "recipe_in_process_ratio" in d:
        out.append(f"the recipe in process, no Ray: {d['recipe_in_process_ratio']:.2f}")
    if name == "vs_trl" and isinstance(d.get("sft"), dict) and "ratio_rayapp_over_trl_tokens_per_s" in d["sft"]:
        out.append(f"SFT tokens/s rayapp / `SFTTrainer`: {d['sft']['ratio_rayapp_over_trl_tokens_per_s']:.2f} (>= {d['sft'].get('goal', 1.0)})")
    if name == "vs_trl" and isinstance(d.get("smollm2_grpo"), dict) and "ratio" in d["smollm2_grpo"]:
        out.append(f"GRPO with SmolLM2-135M as the policy: {d['smollm2_grpo']['ratio']:.2f}")
    if name == "packing" and isinstance(d.get("datasets"), dict):
        out += [f"{k}: {v['ratio']:.2f} (padding removed allows {v['ideal_ratio']:.2f})" for k, v in d["datasets"].items()
                if "ratio" in v and "ideal_ratio" in v]
    if name == "serve_load" and isinstance(d.get("serve"), dict):
        out.append(f"{d.get('clients')} clients, errors {d['serve'].get('errors')}")
        if isinstance(d.get("direct"), dict) and "latency_p99_s" in d["serve"]:
            out.append("p50 / p99 latency s: Serve {:.1f} / {:.1f}, direct {:.1f} / {:.1f}".format(
                d["serve"]["latency_p50_s"], d["serve"]["latency_p99_s"], d["direct"]["latency_p50_s"], d["direct"]["latency_p99_s"]))
    return out


def rows(results: Path = ROOT / "bench" / "results") -> list[str]:
    lines = ["| bench | headline ratio | measured | target | met | also measured |", "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted(results.glob("*.json")):
        d = json.loads(path.read_text())
        if "ratio" not in d or "target" not in d:
            continue
        name = path.stem
        met = "yes" if d["ratio"] >= d["target"] else "**no**"
        lines.append(f"| `{name}` | {HEADLINES.get(name, d.get('metric', ''))} | {d['ratio']:.2f} | {d['target']} | {met} | "
                     f"{'; '.join(second_pairs(name, d))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README's table differs from the results")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + "\n".join(rows()) + "\n" + END + tail
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    print("\n".join(rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
