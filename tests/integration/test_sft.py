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


def test_tiny_full_sft_lowers_loss_and_exports_the_trained_weights(ray_cluster, tmp_path):
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
    # The exported weights are the trained ones: they fit held-out rows far better than the
    # model training started from (an export of the initial or of zeroed weights fails here).
    import torch

    from rayapp.models.io import resolve_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval()
    rows = read_jsonl(ROOT / "data/sft_tiny/val.jsonl")[:16]
    enc = tok([r["input_text"] + " " + r["output_text"] for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.inference_mode():
        tuned_loss = tuned(**enc, labels=labels).loss.item()
        base_loss = base(**enc, labels=labels).loss.item()
    assert tuned_loss < base_loss - 1.0, (tuned_loss, base_loss)


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
    # The merged export computes what base + adapter computes.
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    with torch.inference_mode():
        want = tuned.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    with torch.inference_mode():
        untouched = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval()(input_ids=ids).logits
    assert not torch.allclose(got, untouched, atol=1e-3), "the merged export equals the base model"


def test_packed_sft_trains_as_the_padded_run(ray_cluster, tmp_path):
    """train.packing through Ray Train (FSDP2 over 2 workers): the same losses step for step as
    the padded run, so packing changes what is computed, not what is learned."""
    from rayapp.training.sft import run

    runs = {}
    for name, extra in (("padded", []), ("packed", ["train.packing=true"])):
        out = tmp_path / name
        run(load_job(ROOT / "jobs/sft_tiny_fsdp.yaml", [f"output_dir={out}", "train.max_steps=5", "train.eval_every=5", *extra]))
        runs[name] = _metrics(out)
    padded, packed = runs["padded"], runs["packed"]
    assert [r["units"] for r in packed] == [r["units"] for r in padded]  # the same supervised tokens each step
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert packed[-1]["val_loss"] == pytest.approx(padded[-1]["val_loss"], rel=1e-4)
    assert packed[-1]["loss"] < packed[0]["loss"]
