"""One GRPO and one PPO iteration on the tiny model: 2 Ray Train workers (gloo) and a vLLM CPU
engine. After the job the engine must generate with the updated policy: its log-probs of a fixed
sequence match the exported model/ (scored with transformers) and no longer match the start."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest

from rayapp.config import load_job
from rayapp.config.base import EngineConfig
from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# A smooth reward so that a random policy's samples differ in reward (exact match would be all 0).
LENGTH_REWARD = "rl.rewards=[{function: length, args: {target: 0, scale: 400}}, {function: exact_match, weight: 0.5}]"


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir):
    from rayapp.teachers.pool import VLLMEnginePool

    p = VLLMEnginePool(tiny_model_dir, EngineConfig(num_engines=1, cpus_per_engine=1, max_model_len=128, max_num_seqs=32, kv_cache_gib=1,
                                                      logprobs_mode="processed"), name="rollout")
    yield p
    p.shutdown()


def _hf_logps(model_dir, seq):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logps = torch.log_softmax(logits, -1)
    return [float(logps[i, seq[i + 1]]) for i in range(len(seq) - 1)]


def _check_engine_has_new_weights(pool, out: Path, tiny_model_dir):
    from rayapp.models.io import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    seq = tok.encode("What is 12 + 30? 12 + 30 = 42. So the answer is 42.")
    engine = pool.score([seq])[0]
    trained = _hf_logps(out / "model", seq)
    base = _hf_logps(tiny_model_dir, seq)
    assert max(abs(a - b) for a, b in zip(engine, trained, strict=True)) < 2e-3
    assert max(abs(a - b) for a, b in zip(base, trained, strict=True)) > 1e-2


def _check_sync_sent_the_model(row: dict, out: Path) -> None:
    """The sync moved the whole policy (its float32 weights, as many bytes as the exported model
    holds, tied embeddings counted once or twice) and its parts add up to its time."""
    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        exported = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert exported * 0.99 <= row["sync_bytes"] <= exported * 2.01, (row["sync_bytes"], exported)
    parts = row["sync_gather_s"] + row["sync_transfer_s"] + row["sync_load_s"]
    assert 0 < parts <= row["time_sync_s"] * 1.01, (parts, row["time_sync_s"])


def _rows(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_one_grpo_iteration_updates_the_engine(pool, tiny_model_dir, tmp_path):
    from rayapp.training.rlhf import run

    out = tmp_path / "grpo"
    cfg = load_job(
        ROOT / "jobs/rlhf_grpo.yaml",
        [f"output_dir={out}", "rl.iterations=1", "rl.prompts_per_iteration=4", "sampling.n=4", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.learning_rate=3e-3", "rl.eval_prompts=0", LENGTH_REWARD, "sampling.temperature=0.7"],
    )
    summary = run(cfg, pool=pool)
    (row,) = _rows(out)
    for key in ("reward_mean", "reward_std", "kl_ref", "entropy", "response_len", "clip_fraction", "time_generate_s",
                "time_score_s", "time_train_s", "time_sync_s", "sync_share", "reward_length", "reward_exact_match"):
        assert key in row, key
    assert row["reward_std"] > 0
    # Entropy per token of the sampling distribution: between 0 and log |V|.
    from rayapp.models.io import load_tokenizer

    assert 0 < row["entropy"] < math.log(len(load_tokenizer(str(tiny_model_dir))))
    _check_sync_sent_the_model(row, out)
    assert row["kl_ref"] == pytest.approx(0.0, abs=1e-4)  # the rollout policy is the reference in iteration 1
    assert "value_loss" not in row
    # the engine's log-probs of what it sampled at T = 0.7 and the trainer's at T = 0.7 agree up to
    # numerics (the trainer at T = 1, as before the fix, is off by far more: bench/rl_iteration.py)
    assert row["mismatch_kl"] < 1e-5 and row["tis_capped"] == 0.0
    ev = json.loads((out / "eval.json").read_text())
    assert 0 < ev["sync_share"] < 1
    assert (out / "plots" / "reward.png").exists() and (out / "report.html").exists()
    assert Path(summary["model"]).exists()
    _check_engine_has_new_weights(pool, out, tiny_model_dir)


def test_one_ppo_iteration_updates_the_engine(pool, tiny_model_dir, tmp_path):
    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import load_reward_model, save_reward_model
    from rayapp.training.rlhf import run

    # A reward model in the reward_model job's export format (untrained head): scored by a Ray actor.
    tok = load_tokenizer(str(tiny_model_dir))
    rm_dir = save_reward_model(load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    out = tmp_path / "ppo"
    cfg = load_job(
        ROOT / "jobs/rlhf_ppo.yaml",
        [f"output_dir={out}", "rl.iterations=1", "rl.prompts_per_iteration=16", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.learning_rate=3e-3", "rl.eval_prompts=0", LENGTH_REWARD,
         f"rl.reward_model={rm_dir}", "rl.reward_model_weight=0.1"],
    )
    run(cfg, pool=pool)
    (row,) = _rows(out)
    assert 0 <= row["clip_fraction"] <= 1 and math.isfinite(row["value_loss"])
    _check_sync_sent_the_model(row, out)
    assert "reward_model" in row and row["reward_model"] != 0.0
    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert not any("value_head" in k for k in f.keys())  # the exported policy has no value head
    _check_engine_has_new_weights(pool, out, tiny_model_dir)


def test_two_iterations_resume_after_the_first_and_track_to_tensorboard(pool, tiny_model_dir, tmp_path, monkeypatch):
    """A GRPO job of 1 iteration, then the same output_dir with rl.iterations=2 (a job stopped right
    after iteration 1's checkpoint, re-run): the re-run resumes at iteration 2 (iteration 1's
    metrics row is the first run's, once), its trainer starts from the checkpoint's policy (not
    the base: KL to the reference is no longer 0) and its engine too (engine-vs-trainer KL ~ 0 on
    iteration 2's samples). Both runs go through `rayapp run`'s path (kinds.run) with
    report_to: [tensorboard]: the event files hold rlhf's own series, each step once."""
    import torch
    from safetensors.torch import load_file

    from rayapp import kinds
    from rayapp.training import rlhf
    from tests.unit.test_tracking import tensorboard_scalars

    monkeypatch.setattr(rlhf, "run", functools.partial(rlhf.run, pool=pool))  # kinds.run with this module's engine
    out = tmp_path / "grpo"
    overrides = [f"output_dir={out}", "rl.prompts_per_iteration=4", "sampling.n=4", "train.global_batch_size=8",
                 "train.micro_batch_size=4", "train.learning_rate=3e-3", "rl.eval_prompts=0", LENGTH_REWARD,
                 "sampling.temperature=0.7", "report_to=[tensorboard]"]
    kinds.run(load_job(ROOT / "jobs/rlhf_grpo.yaml", [*overrides, "rl.iterations=1"]))
    (first,) = _rows(out)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-4)
    after_one = load_file(out / "model" / "model.safetensors")

    kinds.run(load_job(ROOT / "jobs/rlhf_grpo.yaml", [*overrides, "rl.iterations=2"]))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0] == first  # not redone: a re-run iteration 1 would have its own timings and samples
    second = rows[1]
    # The trainer continued from the checkpoint: its policy before iteration 2's update is not the
    # reference (with the base weights kl_ref would be 0, as in iteration 1) ...
    assert second["kl_ref"] > 1e-3, second["kl_ref"]
    # ... and the engine sampled iteration 2 with those same weights (pushed at resume): with the base
    # weights in the engine, its log-probs would differ from the trainer's by that KL.
    assert second["mismatch_kl"] < 1e-5, second["mismatch_kl"]
    after_two = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(after_one[k], after_two[k]) for k in after_one)  # iteration 2 trained it further
    _check_engine_has_new_weights(pool, out, tiny_model_dir)

    # report_to: tensorboard, resumed: rlhf's series, each step once, the values of metrics.jsonl.
    scalars, config_text = tensorboard_scalars(out)
    for key in ("reward_mean", "reward_std", "kl_ref", "mismatch_kl", "entropy", "clip_fraction", "time_sync_s"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-5, abs=1e-7)) for r in rows], key
    assert "rlhf" in config_text and "grpo" in config_text
    assert json.loads((out / "tracking.json").read_text())["last_step"] == {"tensorboard": 2}
