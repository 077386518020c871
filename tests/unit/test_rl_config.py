"""RL job configs: cross-field checks name both fields and say what to change; example jobs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayapp.config import ConfigError, load_job

ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_rollouts_must_fill_whole_optimizer_steps(tmp_path):
    p = _job(tmp_path, "kind: rlhf\nrl: {prompts_per_iteration: 3}\nsampling: {n: 2}\ntrain: {global_batch_size: 4, micro_batch_size: 2}\n")
    with pytest.raises(ConfigError, match=r"rl.prompts_per_iteration \(3\) x sampling.n \(2\) = 6 .* train.global_batch_size \(4\)"):
        load_job(p)


def test_grpo_needs_a_group(tmp_path):
    p = _job(tmp_path, "kind: rlhf\nalgorithm: grpo\nsampling: {n: 1}\nrl: {prompts_per_iteration: 16}\n")
    with pytest.raises(ConfigError, match="grpo needs sampling.n >= 2"):
        load_job(p)


def test_nccl_sync_needs_gpus(tmp_path):
    p = _job(tmp_path, "kind: rlhf\nrl: {weight_sync: nccl}\n")
    with pytest.raises(ConfigError, match=r"weight_sync: nccl needs GPU trainers and engines \(resources.use_gpu"):
        load_job(p)
    p = _job(tmp_path, "kind: rlhf\nrl: {weight_sync: nccl}\nresources: {use_gpu: true}\n")  # engines still on CPU
    with pytest.raises(ConfigError, match="engine.use_gpu: true"):
        load_job(p)


def test_unknown_rl_field_names_the_line(tmp_path):
    p = _job(tmp_path, "kind: rlhf\nrl:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=r"job.yaml:3: rl.kl_coef: unknown field"):
        load_job(p)


def test_example_jobs_and_vertex_knobs():
    grpo = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["rl.kl_coeff=0", "train.learning_rate_multiplier=2"])
    assert grpo.algorithm == "grpo" and grpo.rl.kl_coeff == 0 and grpo.train.peak_lr == 2 * grpo.train.learning_rate
    assert grpo.rollouts_per_iteration == 32
    ppo = load_job(ROOT / "jobs/rlhf_ppo.yaml")
    assert ppo.algorithm == "ppo" and ppo.sampling.n == 1
    rm = load_job(ROOT / "jobs/reward_model.yaml")
    assert rm.adapter.rank == 4
    dpo = load_job(ROOT / "jobs/dpo.yaml", ["beta=0.5"])
    assert dpo.beta == 0.5 and dpo.reference == "precompute"


def test_sections_given_in_part_keep_their_kinds_defaults():
    """A `sampling:` or `engine:` block given in part replaced its default whole: an rlhf job with
    `sampling: {temperature: 0.8}` lost n: 4 (GRPO groups of 1) and max_tokens: 64; the on-policy
    student's engine and a deploy job's `deploy:` block lost theirs (max_model_len 256; enabled)."""
    from rayapp.config import load_job_dict

    cfg = load_job_dict({"kind": "rlhf", "sampling": {"temperature": 0.8}, "engine": {"kv_cache_gib": 2}})
    assert (cfg.sampling.temperature, cfg.sampling.n, cfg.sampling.max_tokens) == (0.8, 4, 64)
    assert (cfg.engine.kv_cache_gib, cfg.engine.max_model_len, cfg.engine.max_num_seqs, cfg.engine.logprobs_mode) == (2, 256, 64, "processed")
    cfg = load_job_dict({"kind": "rlhf", "sampling": {"n": 8}})
    assert (cfg.sampling.temperature, cfg.sampling.n, cfg.sampling.max_tokens) == (1.0, 8, 64)
    od = load_job_dict({"kind": "distill", "method": "on_policy", "teacher": {"path": "tiny"},
                        "data": {"train": "data/rl_prompts/train.jsonl"}, "on_policy": {"engine": {"kv_cache_gib": 2}}})
    assert (od.on_policy.engine.max_model_len, od.on_policy.engine.max_num_seqs) == (256, 64)
    dep = load_job_dict({"kind": "deploy", "model": "tiny", "deploy": {"port": 8123}})
    assert dep.deploy.enabled is True and dep.deploy.port == 8123
