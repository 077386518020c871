"""method: on_policy through Ray: 2 Ray Train workers (gloo), a vLLM CPU engine for the student and
one for the teacher (the tiny model tuned here on worked arithmetic answers; the student keeps its
second layer). The student must train: the per-token reverse KL to the teacher on its own samples
falls over the iterations, its engine holds the new weights after every sync (engine and trainer
log-probs agree), and the exported model/ differs from where the student started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TEACHER_STEPS = 120


@pytest.fixture(scope="module")
def tuned_teacher(tmp_path_factory) -> Path:
    """The tiny model tuned in this process on worked answers ("17 + 72 = 89. So the answer is 89.")."""
    import torch

    from rayapp.config.base import TrainConfig
    from rayapp.data.collate import collate_sft
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model, save_model_atomic
    from rayapp.training.loop import LocalReporter, count_supervised, fit
    from rayapp.training.sft import sft_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_tokenizer(resolve_model("tiny"))
    model = load_causal_lm(resolve_model("tiny"))
    data = load_sft_dataset(ROOT / "data/sft_tiny/train.jsonl", tok, None, 64)
    try:
        fit(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), train_items=data.examples, val_items=None,
            collate=lambda it: collate_sft(it, tok.pad_token_id), count_fn=count_supervised, loss_fn=sft_loss,
            cfg=TrainConfig(max_steps=TEACHER_STEPS, global_batch_size=16, micro_batch_size=16, learning_rate=3e-3,
                            checkpoint_every=10_000, log_every=50),
            micro_batch_size=16, reporter=LocalReporter())
    finally:
        torch.set_num_threads(threads)
    return save_model_atomic(model, tok, tmp_path_factory.mktemp("opd_teacher") / "model")


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_on_policy_distillation_lowers_reverse_kl_and_syncs_the_engine(ray_cluster, tuned_teacher, tmp_path):
    from rayapp.training.distill.recipe import run

    out = tmp_path / "opd"
    cfg = load_job(ROOT / "jobs/distill_on_policy.yaml", [
        f"output_dir={out}", f"teacher.path={tuned_teacher}", "on_policy.iterations=8", "on_policy.prompts_per_iteration=8",
        "on_policy.samples_per_prompt=2", "on_policy.max_new_tokens=16", "on_policy.eval_examples=8", "train.learning_rate=3e-3",
        "train.eval_every=8", "train.checkpoint_every=8", "evaluation.max_examples=8", "evaluation.max_new_tokens=16"])
    summary = run(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    kl = [r["reverse_kl"] for r in rows]
    # the student learns the teacher's distribution on its own samples (iteration 1 measures the untrained student)
    assert sum(kl[-3:]) / 3 < 0.8 * kl[0], kl
    for r in rows:
        assert r["tokens"] > 0 and r["sync_max_logp_diff"] < 2e-3, r  # the engine holds the weights just trained
    assert rows[-1]["tokens_trained"] == pytest.approx(sum(r["tokens"] for r in rows))
    assert "val_answer_accuracy" in rows[-1]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["reverse_kl_last"] == pytest.approx(kl[-1]) and "initial_answer_accuracy" in ev and "student_answer_accuracy" in ev
    start, trained = _weights(out / "student_init"), _weights(out / "model")
    assert max(float((start[k] - trained[k]).abs().max()) for k in start) > 1e-3
    assert json.loads((out / "placement.json").read_text())["weight_sync"] == "shm"
    assert Path(summary["report"]).exists()
