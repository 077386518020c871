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


def _seq_logps(model, batches, ppo):
    from rayapp.algorithms.sft import token_logps
    from rayapp.training.rlhf import _forward

    with torch.no_grad():
        return torch.cat([token_logps(_forward(model, b, ppo)[0], b["labels"])[0].sum(-1) for b in batches])


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_one_update_moves_probability_towards_the_rewarded_sample(tiny_model_dir, tiny_tokenizer, algorithm):
    from rayapp.algorithms.rl import grpo_advantages
    from rayapp.models.io import load_causal_lm
    from rayapp.models.value_head import CausalLMWithValueHead
    from rayapp.training.rlhf import _ppo_advantages, _prepare_batches, _update

    job = "rlhf_grpo" if algorithm == "grpo" else "rlhf_ppo"
    cfg = load_job(ROOT / f"jobs/{job}.yaml", ["resources.num_workers=1", "rl.prompts_per_iteration=4", "sampling.n=1" if algorithm == "ppo" else "sampling.n=2",
                                               "train.global_batch_size=4", "train.micro_batch_size=2", "rl.kl_coeff=0.1"])
    torch.manual_seed(0)
    lm = load_causal_lm(tiny_model_dir)
    ppo = algorithm == "ppo"
    model = CausalLMWithValueHead(lm) if ppo else lm
    ref_model = load_causal_lm(tiny_model_dir).eval()
    ref = lambda b: ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # noqa: E731
    rollouts = _rollouts(tiny_tokenizer)
    adv = grpo_advantages(torch.tensor([r["score"] for r in rollouts]), 2)
    for r, a in zip(rollouts, adv.tolist(), strict=True):
        r["advantage"] = a
    batches = _prepare_batches(rollouts, tiny_tokenizer.pad_token_id, 2, model, ref, ppo, "cpu")
    assert torch.allclose(batches[0]["old_logp"], batches[0]["ref_logp"])  # the policy is the reference before training
    if ppo:
        _ppo_advantages(batches, cfg)
        m = torch.cat([b["mask"].flatten() for b in batches]).bool()
        a = torch.cat([b["adv"].flatten() for b in batches])[m]
        assert abs(float(a.mean())) < 1e-5 and float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        assert all(torch.isfinite(b["returns"]).all() for b in batches)
    before = _seq_logps(model, batches, ppo)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sums = _update(model, opt, sched, batches, cfg, 1, ppo, params)
    assert sums["steps"] == cfg.rl.update_epochs  # 4 rollouts, global batch 4: one step per epoch
    assert sums["entropy"] > 0 and (sums["value_loss"] > 0) == ppo
    after = _seq_logps(model, batches, ppo)
    delta = after - before  # rollouts alternate good, bad
    assert delta[0] > 0 and delta[2] > 0, delta
    if ppo:  # token advantages come from an untrained critic: only the ordering within a prompt is certain
        assert delta[0] > delta[1] and delta[2] > delta[3], delta
    else:
        assert delta[1] < 0 and delta[3] < 0, delta
