"""The RL update step in one process (no Ray, no engine): with GRPO advantages, one optimizer step
raises the log-likelihood of the better sample of each group and lowers the worse one's; PPO
advantages come out whitened with the KL penalty in the rewards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayapp.config import load_job

ROOT = Path(__file__).resolve().parents[2]


def _rollouts(tok):
    from rayapp.training.rlhf_rollout import prompt_token_ids

    good = tok.encode("12 + 30 = 42. So the answer is 42.") + [tok.eos_token_id]
    bad = tok.encode("The cat sat on the mat.") + [tok.eos_token_id]
    out = []
    for g, q in enumerate(["What is 12 + 30?", "What is 7 + 5?"]):
        ids = prompt_token_ids(tok, [{"role": "user", "content": q}])
        out += [{"prompt_ids": ids, "response_ids": good, "score": 1.0, "group": g},
                {"prompt_ids": ids, "response_ids": bad, "score": 0.0, "group": g}]
    return out


def _seq_logps(u, batches):
    from rayapp.algorithms.sft import token_logps

    with torch.no_grad():
        return torch.cat([token_logps(u.forward(b)[0], b["labels"])[0].sum(-1) for b in batches])


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_one_update_moves_probability_towards_the_rewarded_sample(tiny_model_dir, tiny_tokenizer, algorithm):
    from rayapp.algorithms.rl import ALGORITHMS
    from rayapp.models.io import load_causal_lm
    from rayapp.models.value_head import CausalLMWithValueHead
    from rayapp.training.loop import build_optimizer
    from rayapp.training.rlhf import PolicyUpdate, group_advantages, prepare_batches, token_advantages, update

    job = "rlhf_grpo" if algorithm == "grpo" else "rlhf_ppo"
    cfg = load_job(ROOT / f"jobs/{job}.yaml", ["resources.num_workers=1", "rl.prompts_per_iteration=4", "sampling.n=1" if algorithm == "ppo" else "sampling.n=2",
                                               "train.global_batch_size=4", "train.micro_batch_size=2", "rl.kl_coeff=0.1",
                                               "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.min_lr_ratio=1"])
    algo = ALGORITHMS[cfg.algorithm]
    torch.manual_seed(0)
    lm = load_causal_lm(tiny_model_dir)
    model = CausalLMWithValueHead(lm) if algo.critic else lm
    ref_model = load_causal_lm(tiny_model_dir).eval()
    ref = lambda b: ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],  # noqa: E731
                              logits_to_keep=b.get("logits_to_keep", 0)).logits
    opt = build_optimizer(model, cfg.train, 10)
    u = PolicyUpdate(cfg, algo, model, opt, ref)
    rollouts = _rollouts(tiny_tokenizer)
    if not algo.critic:  # GRPO: advantages within each prompt's group, on rank 0
        group_advantages(rollouts, cfg, algo)
    batches = prepare_batches(u, rollouts, tiny_tokenizer.pad_token_id)
    assert torch.allclose(batches[0]["old_logp"], batches[0]["ref_logp"])  # the policy is the reference before training
    if algo.critic:
        token_advantages(u, batches)
        m = torch.cat([b["mask"].flatten() for b in batches]).bool()
        a = torch.cat([b["adv"].flatten() for b in batches])[m]
        assert abs(float(a.mean())) < 1e-5 and float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        assert all(torch.isfinite(b["returns"]).all() for b in batches)
    before = _seq_logps(u, batches)
    sums = update(u, batches)
    assert sums["steps"] == cfg.rl.update_epochs  # 4 rollouts, global batch 4: one step per epoch
    assert sums["entropy"] > 0 and (sums["value_loss"] > 0) == algo.critic
    assert opt.optimizer_steps == cfg.rl.update_epochs
    after = _seq_logps(u, batches)
    delta = after - before  # rollouts alternate good, bad
    assert delta[0] > 0 and delta[2] > 0, delta
    if algo.critic:  # token advantages come from an untrained critic: only the ordering within a prompt is certain
        assert delta[0] > delta[1] and delta[2] > delta[3], delta
    else:
        assert delta[1] < 0 and delta[3] < 0, delta


def test_value_head_learns_at_its_multiple_of_the_learning_rate(tiny_model_dir):
    """One optimizer construction for every recipe: the RL value head is its own param group."""
    from rayapp.config.base import TrainConfig
    from rayapp.models.io import load_causal_lm
    from rayapp.models.value_head import CausalLMWithValueHead
    from rayapp.training.loop import build_optimizer

    model = CausalLMWithValueHead(load_causal_lm(tiny_model_dir))
    opt = build_optimizer(model, TrainConfig(learning_rate=1e-3, warmup_ratio=0.0), 10, lr_multipliers={"value_head": 10.0})
    groups = {len(g["params"]): g["lr"] for g in opt.optimizer.param_groups}
    assert groups == {2: pytest.approx(1e-2), sum(1 for _ in model.lm.parameters()): pytest.approx(1e-3)}
