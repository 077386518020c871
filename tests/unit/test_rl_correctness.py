"""The wiring around the RL losses (issue 15): log-probs at the sampling temperature, identical
passes for old and new log-probs (dropout off), truncated importance sampling on the engine's
sampled-token log-probs and the mismatch KL, k3 clamped at +-10, RL's sampling defaults, distill
logits.temperature refused, the reward model scored in the format it was trained on. Hand-computed
tensors; each test fails if its fix is reverted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayapp.config import ConfigError, load_job, load_job_dict

ROOT = Path(__file__).resolve().parents[2]


# -- log-probs at the sampling temperature ----------------------------------------------------------
def test_token_logps_are_those_of_the_tempered_distribution():
    from rayapp.algorithms import IGNORE_INDEX
    from rayapp.algorithms.sft import token_logps

    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])            # (1, 2, 2): position 0 predicts token 0
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    # T = 1: 2 - log(e^2 + 1) = -0.126928; T = 2: z / T = [1, 0] -> 1 - log(e + 1) = -0.313262;
    # T = 0.5: [4, 0] -> 4 - log(e^4 + 1) = -0.018150
    for t, want in ((1.0, -0.126928), (2.0, -0.313262), (0.5, -0.018150)):
        logp, mask = token_logps(logits, labels, t)
        assert mask.tolist() == [[True]]
        assert float(logp[0, 0]) == pytest.approx(want, abs=1e-5), t
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logps(logits, labels, 0.0)


# -- k3 clamped at +-10 ---------------------------------------------------------------------------
def test_k3_log_ratio_is_clamped_at_10():
    from rayapp.algorithms.rl import kl_k3

    logp = torch.tensor([0.0, 0.0, 0.0, -15.0], requires_grad=True)
    ref = torch.tensor([0.0, 1.0, -15.0, 0.0])                  # log r = ref - logp: 0, 1, -15, 15
    k3 = kl_k3(logp, ref)
    want = [0.0, math.e - 2.0, math.exp(-10) - 1 + 10, math.exp(10) - 11]  # 0, 0.718282, 9.000045, 22015.47
    assert k3.tolist() == pytest.approx(want, rel=1e-5)
    assert float(k3[3].detach()) < 3e4  # unclamped: exp(15) - 16 = 3.27e6
    k3.sum().backward()
    assert logp.grad[2:].tolist() == [0.0, 0.0]  # past the clamp: no gradient
    assert float(logp.grad[1]) == pytest.approx(-(math.e - 1.0), rel=1e-5)  # d/dlogp (e^(ref-logp) - 1 - ref + logp)


# -- truncated importance sampling and the mismatch KL ----------------------------------------------
def test_truncated_is_weights_are_capped_ratios_of_trainer_to_engine():
    from rayapp.algorithms.rl import truncated_is_weights

    old = torch.tensor([[-1.0, -1.0, -2.0, -3.0]])
    engine = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, engine, mask, cap=2.0)
    # exp(0) = 1; exp(1) = 2.718 -> capped at 2; exp(-1.5) = 0.223130; masked out -> 0
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, math.exp(-1.5), 0.0], abs=1e-6)
    assert not w.requires_grad


def test_is_weights_scale_each_tokens_surrogate():
    from rayapp.algorithms.rl import grpo_policy_loss, ppo_policy_loss

    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    w = torch.tensor([[2.0, 0.5, 1.0]])
    # ratio 1 everywhere: per token -A * w = [-2, 0.5, -2] -> mean -3.5 / 3
    loss, _, _ = ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2, is_weights=w)
    assert float(loss.detach()) == pytest.approx(-3.5 / 3, abs=1e-6)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2 / 3, 0.5 / 3, -2 / 3], abs=1e-6)  # d(-A w rho)/dlogp = -A w / 3
    plain, _, _ = ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2)
    assert float(plain.detach()) == pytest.approx(-2 / 3, abs=1e-6)
    # GRPO: the weights multiply the surrogate, not the KL term (0 here: ref = logp)
    g, _, _ = grpo_policy_loss(logp, logp.detach(), adv, mask, 0.2, ref_logp=logp.detach(), kl_coef=0.1, is_weights=w)
    assert float(g) == pytest.approx(-3.5 / 3, abs=1e-6)


def test_mismatch_kl_is_k3_of_engine_samples():
    from rayapp.algorithms.rl import mismatch_kl

    trainer = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # r = pi / q = 2 -> 2 - 1 - ln 2 = 0.306853; r = 1 -> 0; the third token is masked out
    assert float(mismatch_kl(trainer, engine, mask)) == pytest.approx(1.0 - math.log(2.0), abs=1e-6)


def test_collate_puts_engine_logps_where_token_logps_puts_the_trainers():
    from rayapp.algorithms.sft import token_logps
    from rayapp.training.rlhf_rollout import collate_rollouts

    rollouts = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "score": 1.0, "rollout_logps": [-0.1, -0.2]},
                {"prompt_ids": [5], "response_ids": [8, 9, 10], "score": 0.0, "rollout_logps": [-0.3, -0.4, -0.5]}]
    b = collate_rollouts(rollouts, pad_id=0)
    _, mask = token_logps(torch.zeros(2, 5, 16), b["labels"])
    assert b["rollout_logp"].shape == (2, 4)
    assert torch.allclose(b["rollout_logp"], torch.tensor([[0, 0, -0.1, -0.2], [-0.3, -0.4, -0.5, 0]]))
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert "rollout_logp" not in collate_rollouts([{k: v for k, v in rollouts[0].items() if k != "rollout_logps"}], 0)


def test_collect_rollouts_asks_the_engine_for_the_sampled_tokens_logps(tiny_tokenizer):
    from rayapp.data.formats import PromptRecord
    from rayapp.teachers import Completion
    from rayapp.training.rlhf_rollout import collect_rollouts, prompt_token_ids

    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", [])
    messages = [{"role": "user", "content": "What is 1 + 1?"}]
    n_prompt = len(prompt_token_ids(tiny_tokenizer, messages))
    seen = {}

    class FakePool:  # the engine's side is exercised for real in tests/integration/test_rlhf.py
        def generate(self, prompts, sampling):
            seen["sampling"] = sampling
            return [Completion(text="2", token_ids=[17, 2], finish_reason="stop", prompt_index=0, sample_index=0,
                               prompt_tokens=n_prompt, logprobs=[{17: -0.5, 3: -1.0}, {2: -0.25}])]

    rollouts, _ = collect_rollouts(FakePool(), [PromptRecord(messages=messages, extra={"answer": "2"})], cfg.sampling,
                                   tiny_tokenizer, lambda text, row: (1.0, {}), [], 1.0)
    assert seen["sampling"].logprobs == 0 and seen["sampling"].temperature == cfg.sampling.temperature
    assert rollouts[0]["rollout_logps"] == [-0.5, -0.25]


# -- identical passes: dropout off, temperature everywhere ------------------------------------------
def _rollouts(tok):
    from rayapp.training.rlhf_rollout import prompt_token_ids

    good = tok.encode("12 + 30 = 42. So the answer is 42.") + [tok.eos_token_id]
    bad = tok.encode("The cat sat on the mat.") + [tok.eos_token_id]
    ids = prompt_token_ids(tok, [{"role": "user", "content": "What is 12 + 30?"}])
    return [{"prompt_ids": ids, "response_ids": r, "score": s, "group": 0} for r, s in ((good, 1.0), (bad, 0.0))] * 2


def _train_lora(model) -> None:
    """A fresh LoRA's B is 0, so dropout on its path changes nothing; give B the values a trained one has."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _policy_update(tiny_model_dir, temperature: float):
    from rayapp.algorithms.rl import ALGORITHMS
    from rayapp.training.loop import build_optimizer
    from rayapp.training.rlhf import PolicyUpdate, build_policy

    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["resources.num_workers=1", "rl.prompts_per_iteration=2", "sampling.n=2",
                                                   "train.global_batch_size=4", "train.micro_batch_size=2", "rl.kl_coeff=0",
                                                   f"sampling.temperature={temperature}", "adapter={rank: 4, dropout: 0.1}"])
    algo = ALGORITHMS[cfg.algorithm]
    torch.manual_seed(0)
    lm, model = build_policy(str(tiny_model_dir), cfg, algo)
    _train_lora(lm)
    return PolicyUpdate(cfg, algo, model, build_optimizer(model, cfg.train, 10)), lm


def test_old_log_probs_are_taken_at_the_sampling_temperature(tiny_model_dir, tiny_tokenizer):
    from rayapp.training.rlhf import prepare_batches

    u, lm = _policy_update(tiny_model_dir, 0.7)
    b = prepare_batches(u, _rollouts(tiny_tokenizer), tiny_tokenizer.pad_token_id)[0]
    lm.eval()
    with torch.no_grad():
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    w = b["old_logp"].shape[1]  # the response window (response_window): the last w of the T-1 positions
    labels = b["labels"][:, 1:].clamp(min=0).unsqueeze(-1)
    want = torch.log_softmax(logits[:, -w:] / 0.7, dim=-1).gather(-1, labels).squeeze(-1)
    m = b["mask"].bool()
    assert torch.allclose(b["old_logp"][m], want[m], atol=1e-5)
    at_one = torch.log_softmax(logits[:, -w:], dim=-1).gather(-1, labels).squeeze(-1)
    assert not torch.allclose(b["old_logp"][m], at_one[m], atol=1e-3)


def test_first_update_sees_ratio_one_with_lora_dropout_and_temperature(tiny_model_dir, tiny_tokenizer):
    """Identical weights: the update's log-probs (train mode, T = 0.7) equal the old ones (eval mode),
    so every ratio is 1 (approx_kl 0, nothing clipped) despite LoRA dropout 0.1. With dropout on, or
    the update scoring at T = 1, the ratios spread (0.75-1.28 before the fix)."""
    from rayapp.training.rlhf import group_advantages, prepare_batches, update

    u, _ = _policy_update(tiny_model_dir, 0.7)
    rollouts = _rollouts(tiny_tokenizer)
    group_advantages(rollouts, u.cfg, u.algo)
    batches = prepare_batches(u, rollouts, tiny_tokenizer.pad_token_id)
    sums = update(u, batches)  # 4 rollouts, global batch 4: one step, its forwards all before it
    assert sums["steps"] == 1
    assert sums["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert sums["clip_fraction"] == 0.0
    assert any(isinstance(m, torch.nn.Dropout) for m in u.model.modules())  # LoRA's dropout is there, at p = 0
    assert all(m.p == 0.0 for m in u.model.modules() if isinstance(m, torch.nn.Dropout))


def test_update_on_the_response_window_equals_the_update_on_every_position(tiny_model_dir, tiny_tokenizer):
    """response_window: the LM head at the response positions only gives the same old log-probs,
    the same engine log-probs' alignment and the same gradients as the LM head at every position."""
    from rayapp.training.rlhf import group_advantages, prepare_batches, update

    rollouts = _rollouts(tiny_tokenizer)
    rollouts[1] = {**rollouts[1], "prompt_ids": rollouts[1]["prompt_ids"] + [7, 8, 9]}  # prompts of unequal length
    for r in rollouts:
        r["rollout_logps"] = [-0.1 * (i + 1) for i in range(len(r["response_ids"]))]
    runs = {}
    for crop in (True, False):
        u, _ = _policy_update(tiny_model_dir, 0.7)
        assert u.crops_logits
        u.__dict__["crops_logits"] = crop
        rs = [dict(r) for r in rollouts]
        group_advantages(rs, u.cfg, u.algo)
        batches = prepare_batches(u, rs, tiny_tokenizer.pad_token_id)
        update(u, batches)
        runs[crop] = batches, {n: p.detach().clone() for n, p in u.model.named_parameters() if p.requires_grad}
    (cut, p_cut), (full, p_full) = runs[True], runs[False]
    for c, f in zip(cut, full, strict=True):
        w = c["old_logp"].shape[1]
        assert w < f["old_logp"].shape[1] and c["logits_to_keep"] == w + 1
        assert not f["mask"][:, :-w].any()  # nothing labelled before the window
        for key in ("old_logp", "mask", "rollout_logp", "is_weights", "adv"):
            assert torch.allclose(c[key], f[key][:, -w:], atol=1e-5), key
    assert p_cut.keys() == p_full.keys()
    for n in p_cut:
        assert torch.allclose(p_cut[n], p_full[n], atol=1e-5), n


def test_dpo_policy_and_reference_passes_agree_with_lora_dropout(tiny_model_dir):
    """DPO builds its policy with dropout off, so the reference pass (eval) and the policy's (train)
    agree before the first step: every implicit reward starts at 0."""
    import inspect

    from rayapp.training import dpo
    from rayapp.training.launch import build_model

    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["adapter={rank: 4, dropout: 0.1}"])
    torch.manual_seed(0)
    model = build_model(str(tiny_model_dir), cfg, dropout=False)
    _train_lora(model)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.train()
        pol = model(input_ids=ids).logits
    assert torch.equal(ref, pol)
    assert "dropout=False" in inspect.getsource(dpo.dpo_worker)


# -- config -------------------------------------------------------------------------------------------
def test_rl_sampling_block_without_temperature_samples_at_one():
    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["sampling={max_tokens: 8, n: 4}"])
    assert cfg.sampling.temperature == 1.0
    assert cfg.engine.logprobs_mode == "processed"  # the engine returns the log-probs it sampled from
    cfg = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["sampling.temperature=0.7", "engine={num_engines: 1, max_model_len: 128}"])
    assert cfg.sampling.temperature == 0.7 and cfg.engine.logprobs_mode == "processed"
    with pytest.raises(ConfigError, match="sampling.temperature"):
        load_job(ROOT / "jobs/rlhf_grpo.yaml", ["sampling.temperature=0"])
    assert cfg.rl.tis_cap == 2.0


def test_processed_logprobs_mode_reaches_vllm():
    from rayapp.config.base import EngineConfig
    from rayapp.teachers.pool import llm_kwargs

    assert llm_kwargs("m", EngineConfig(logprobs_mode="processed"))["logprobs_mode"] == "processed_logprobs"
    assert "logprobs_mode" not in llm_kwargs("m", EngineConfig())


def test_distill_logits_temperature_other_than_one_is_refused():
    job = {"kind": "distill", "method": "logits", "model": {"path": "tiny"}, "teacher": {"path": "tiny"},
           "data": {"train": "data/sft/train.jsonl"}, "logits": {"temperature": 2.0}}
    with pytest.raises(ConfigError, match="logits.temperature is 2.0.*temperature 1"):
        load_job_dict(job)
    job["logits"]["temperature"] = 1.0
    load_job_dict(job)


# -- the reward model sees its training format --------------------------------------------------------
def test_reward_model_scores_conversations_as_it_was_trained(tiny_model_dir, tmp_path):
    import shutil

    from rayapp.data.tokenize import trained_chat_template
    from rayapp.models.io import load_tokenizer
    from rayapp.training.rlhf_rollout import RewardModelActor

    out = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, out / "model")
    assert trained_chat_template(out / "model") == "auto"  # no job config: a model from elsewhere
    (out / "config.resolved.yaml").write_text("kind: reward_model\ndata:\n  train: x.jsonl\n  chat_template: never\n")
    assert trained_chat_template(out / "model") == "never"

    seen = []

    class Scorer:  # records what the model is shown
        def __call__(self, input_ids, attention_mask):
            seen.extend(input_ids.tolist())
            return type("Out", (), {"logits": torch.zeros(len(input_ids), 1)})()

    actor = RewardModelActor.__new__(RewardModelActor)
    actor.tokenizer, actor.model = load_tokenizer(str(out / "model")), Scorer()
    actor.chat_template = trained_chat_template(out / "model")
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    actor.score([conv])
    text = actor.tokenizer.decode(seen[0])
    assert text.startswith("user: What is 2 + 2?\nassistant: 4") and "<|im_start|>" not in text


# -- diagnostics: which groups carry a GRPO advantage ------------------------------------------------
def test_groups_mixed_counts_groups_whose_rewards_differ_and_their_advantages_are_the_only_nonzero():
    from rayapp.algorithms.rl import grpo_advantages
    from rayapp.training.rlhf_rollout import mixed_groups

    scores = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # all wrong, all right, one right of four
    assert mixed_groups([{"score": s} for s in scores], 4) == pytest.approx(1 / 3)
    adv = grpo_advantages(torch.tensor(scores), 4).view(3, 4)
    assert torch.isfinite(adv).all() and adv[:2].abs().max() == 0 and adv[2].abs().min() > 0
    assert adv[2, 1] > 0 > adv[2, 0]
