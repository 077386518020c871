"""SFT on Ray Train with 2 CPU workers, on the shared local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_tiny_full_sft_lowers_loss_and_exports_a_model_that_generates(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayapp.training.sft import run

    out = tmp_path / "sft"
    cfg = load_job(ROOT / "jobs/sft_tiny.yaml", [f"output_dir={out}", "train.epochs=1", "train.eval_every=4"])
    summary = run(cfg)
    rows = _metrics(out)
    train = [r["loss"] for r in rows]
    assert train[-1] < train[0] - 0.5, train
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0]
    for name in ("config.resolved.yaml", "metrics.jsonl", "eval.json", "report.html", "plots/loss.png", "data_stats.json"):
        assert (out / name).exists(), name
    assert any((out / "checkpoints").glob("step_*")), "no Ray Train checkpoint written"
    model_dir = Path(summary["model"])
    assert list(model_dir.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tok("What is 2 + 3?", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_lora_sft_writes_an_adapter_that_peft_loads(ray_cluster, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayapp.models.io import resolve_model
    from rayapp.training.sft import run

    out = tmp_path / "lora"
    cfg = load_job(
        ROOT / "jobs/sft_tiny.yaml",
        [f"output_dir={out}", "train.max_steps=4", "adapter.rank=4", "adapter.export=both", "train.learning_rate=1e-2"],
    )
    run(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b), "adapter weights did not train"
    assert (out / "model" / "config.json").exists()  # merged export too
