"""method: on_policy around the maths, in one process: config checks that name the fields, the
teacher's log-probs lined up with the sampled tokens (fake pools stand in for the vLLM engines;
tests/integration/test_distill_on_policy.py runs the real ones), and the advantages of a student
that already is the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayapp.config.loader import ConfigError, load_job_dict
from rayapp.teachers import Completion

ROOT = Path(__file__).resolve().parents[2]


def _job(**kw) -> dict:
    base = {"kind": "distill", "method": "on_policy", "model": {"path": "tiny", "max_seq_len": 64}, "task_type": "number",
            "teacher": {"path": "tiny"}, "data": {"train": str(ROOT / "data/sft_tiny/train.jsonl")},
            "on_policy": {"iterations": 2, "prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
            "train": {"global_batch_size": 8, "micro_batch_size": 4}, "resources": {"num_workers": 2}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def test_config_errors_name_the_fields():
    cfg = load_job_dict(_job())
    assert cfg.on_policy.temperature == 1.0 and cfg.on_policy.reward_weight == 0.0
    with pytest.raises(ConfigError, match=r"on_policy.prompts_per_iteration \(4\) x on_policy.samples_per_prompt \(3\)"):
        load_job_dict(_job(on_policy={"samples_per_prompt": 3}))
    with pytest.raises(ConfigError, match="teacher.path is missing but method: on_policy"):
        load_job_dict({k: v for k, v in _job().items() if k != "teacher"})
    with pytest.raises(ConfigError, match="remove train.max_steps"):
        load_job_dict(_job(train={"max_steps": 5}))
    with pytest.raises(ConfigError, match="on_policy.temperature"):
        load_job_dict(_job(on_policy={"temperature": 0}))
    with pytest.raises(ConfigError, match="adapter"):
        load_job_dict(_job(adapter={"rank": 4}))
    with pytest.raises(ConfigError, match="teacher.engine.max_model_len"):
        load_job_dict(_job(teacher={"engine": {"max_model_len": 64}}))


class FakeStudentPool:
    """Answers every prompt with fixed token ids (what an engine returns), ``n`` times."""

    def __init__(self, tokenizer, answer_ids):
        self.tokenizer, self.answer_ids = tokenizer, answer_ids

    def generate(self, prompts, sampling):
        from rayapp.training.distill.on_policy import engine_prompt_ids

        out = []
        for i, p in enumerate(prompts):
            for k in range(sampling.n):
                out.append(Completion(self.tokenizer.decode(self.answer_ids), list(self.answer_ids), "stop", prompt_index=i,
                                      sample_index=k, prompt_tokens=len(engine_prompt_ids(self.tokenizer, p))))
        return out


class FakeTeacherPool:
    """score(): the log-prob of token j + 1 of each sequence is -(j + 1) / 100 (its position, readable);
    with top_k, tokens 0..k-1 come with log-probs -1, -2, ... beside the given token (as vLLM returns them)."""

    def score(self, sequences, top_k=0):
        if not top_k:
            return [[-(j + 1) / 100 for j in range(len(s) - 1)] for s in sequences]
        return [[{**{t: -(t + 1.0) for t in range(top_k)}, s[j + 1]: -(j + 1) / 100} for j in range(len(s) - 1)] for s in sequences]


def test_teacher_logprobs_line_up_with_the_sampled_tokens(tiny_tokenizer):
    from rayapp.training.distill.on_policy import engine_prompt_ids, sample_and_score

    cfg = load_job_dict(_job())
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    ids = engine_prompt_ids(tiny_tokenizer, prompt)
    answer = tiny_tokenizer.encode("1 + 2 = 3. So the answer is 3.", add_special_tokens=False)
    rollouts, _ = sample_and_score(FakeStudentPool(tiny_tokenizer, answer), FakeTeacherPool(),
                                   [{"prompt": prompt, "prompt_ids": ids, "answer": "3"}], cfg, tiny_tokenizer)
    assert len(rollouts) == cfg.on_policy.samples_per_prompt
    r = rollouts[0]
    P = len(ids)
    # answer token i sits at sequence position P + i: the teacher's entry P + i - 1
    assert r["teacher_logps"] == pytest.approx([-(P + i) / 100 for i in range(len(answer))])
    assert r["score"] == 1.0  # its answer matches


def test_a_student_that_is_its_teacher_gets_zero_advantage(tiny_model_dir, tiny_tokenizer):
    from rayapp.algorithms.on_policy import reverse_kl_sum
    from rayapp.algorithms.sft import token_logps
    from rayapp.models.io import load_causal_lm
    from rayapp.training.distill.on_policy import engine_prompt_ids, prepare_batches
    from rayapp.training.rlhf_rollout import collate_rollouts

    cfg = load_job_dict(_job())
    model = load_causal_lm(str(tiny_model_dir)).eval()
    rollouts = []
    for q, a in (("What is 1 + 2?", "3"), ("What is 10 - 4?", "10 - 4 = 6. So")):
        rollouts.append({"prompt_ids": engine_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]),
                         "response_ids": tiny_tokenizer.encode(a, add_special_tokens=False), "score": 0.0})
    b = collate_rollouts(rollouts, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        lp, mask = token_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    for i, r in enumerate(rollouts):  # the teacher's scores: the same model's log-probs of the sampled tokens
        r["teacher_logps"] = lp[i][mask[i]].tolist()
    (batch,) = prepare_batches(model, rollouts, cfg, tiny_tokenizer.pad_token_id, "cpu")
    assert batch["mask"].sum() == sum(len(r["response_ids"]) for r in rollouts)
    assert batch["adv"].abs().max() < 1e-5
    assert abs(float(reverse_kl_sum(batch["old_logp"], batch["teacher_logp"], batch["mask"]))) < 1e-4


def test_top_k_teacher_scores_line_up_and_enter_the_loss(tiny_model_dir, tiny_tokenizer):
    from rayapp.models.io import load_causal_lm
    from rayapp.training.distill.on_policy import engine_prompt_ids, prepare_batches, sample_and_score, update
    from rayapp.training.loop import build_optimizer

    cfg = load_job_dict(_job(on_policy={"top_k": 3}, train={"global_batch_size": 8, "micro_batch_size": 8},
                             resources={"num_workers": 1}))
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    ids = engine_prompt_ids(tiny_tokenizer, prompt)
    answer = tiny_tokenizer.encode("1 + 2 = 3. So the answer is 3.", add_special_tokens=False)
    prompts = [{"prompt": prompt, "prompt_ids": ids, "answer": "3"}] * 4
    rollouts, _ = sample_and_score(FakeStudentPool(tiny_tokenizer, answer), FakeTeacherPool(), prompts, cfg, tiny_tokenizer)
    r, P = rollouts[0], len(ids)
    assert r["teacher_logps"] == pytest.approx([-(P + i) / 100 for i in range(len(answer))])
    assert len(r["topk_ids"]) == len(answer) and all(len(x) == 3 for x in r["topk_ids"])
    model = load_causal_lm(str(tiny_model_dir)).eval()
    (b,) = prepare_batches(model, rollouts, cfg, tiny_tokenizer.pad_token_id, "cpu")
    # the position that predicts answer token i (P - 1 + i) holds that token's top-k; the others are masked out
    assert b["topk_mask"][0].nonzero().flatten().tolist() == list(range(P - 1, P - 1 + len(answer)))
    assert b["topk_logprobs"][0, P - 1].tolist() == pytest.approx(sorted(r["topk_logprobs"][0], reverse=True))
    opt = build_optimizer(model, cfg.train, 1)
    before = [p.detach().clone() for p in model.parameters()]
    sums = update(model, opt, [b], cfg, 1)
    assert sums["topk_kl"] > 0 and sums["steps"] == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # parameters change
