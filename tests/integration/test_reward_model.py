"""Reward model job end to end on Ray Train (2 CPU workers, LoRA rank 4): both preference formats,
held-out pairwise accuracy above chance, and an exported model that transformers loads and scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayapp.config import load_job

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_reward_model_job_learns_to_prefer_correct_answers(ray_cluster, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rayapp.kinds import run  # as `rayapp run` does, with live tracking for reward_model
    from tests.unit.test_tracking import assert_tensorboard_holds_every_series

    out = tmp_path / "rm"
    cfg = load_job(ROOT / "jobs/reward_model.yaml", [f"output_dir={out}", "report_to=[tensorboard]"])
    summary = run(cfg)
    assert_tensorboard_holds_every_series(out, "reward_model")
    ev = json.loads((out / "eval.json").read_text())
    # 96 held-out pairs: chance is 0.5 (the untrained head's accuracy is measured too).
    assert ev["val_accuracy"] >= 0.62, ev
    assert ev["val_accuracy"] > ev["initial_val_accuracy"] + 0.05, ev
    assert ev["val_loss"] < ev["initial_val_loss"], ev
    for name in ("config.resolved.yaml", "metrics.jsonl", "report.html", "data_stats.json"):
        assert (out / name).exists(), name
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["pairs"] == 384  # both row formats in the file were read

    model_dir = Path(summary["model"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert rm.config.num_labels == 1 and not any("lora" in k for k in rm.state_dict())

    def score(question, answer):
        text = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return float(rm(**tok(text, return_tensors="pt")).logits[0, 0])

    assert score("What is 64 - 17?", "64 - 17 = 47. So the answer is 47.") > score("What is 64 - 17?", "The answer is 45.")
