"""DPO job end to end on Ray Train (2 CPU workers): the held-out log-likelihood margin of chosen over
rejected rises, the implicit-reward accuracy beats chance, and model/ is a plain HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _rows(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_dpo_job_raises_the_chosen_over_rejected_margin(ray_cluster, tmp_path):
    """Through kinds.run, as `rayapp run` does, with report_to: [tensorboard] (live tracking for dpo)."""
    from rayapp.kinds import run
    from tests.unit.test_tracking import assert_tensorboard_holds_every_series

    out = tmp_path / "dpo"
    cfg = load_job(ROOT / "jobs/dpo.yaml", [f"output_dir={out}", "report_to=[tensorboard]"])
    summary = run(cfg)
    assert_tensorboard_holds_every_series(out, "dpo")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["initial_val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert ev["val_logp_margin"] > ev["initial_val_logp_margin"] + 1.0, ev
    assert ev["val_reward_accuracy"] > 0.6, ev
    assert ev["val_loss"] < ev["initial_val_loss"], ev
    assert list(Path(summary["model"]).glob("*.safetensors"))
    assert any((out / "checkpoints").glob("step_*"))


def test_dpo_lora_with_frozen_reference(ray_cluster, tmp_path):
    from rayapp.training.dpo import run

    out = tmp_path / "dpo_lora"
    cfg = load_job(
        ROOT / "jobs/dpo.yaml",
        [f"output_dir={out}", "reference=frozen", "adapter.rank=4", "train.max_steps=6", "train.learning_rate=5e-3", "train.eval_every=6"],
    )
    run(cfg)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["initial_val_loss"] == pytest.approx(0.6931, abs=1e-3)  # the base with adapters disabled is the reference
    assert ev["val_logp_margin"] > ev["initial_val_logp_margin"], ev
    assert (out / "adapter" / "adapter_config.json").exists()
