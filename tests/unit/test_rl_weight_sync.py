"""What the weight sync sends: the causal LM's Hugging Face state dict, LoRA merged, no value head;
and the rollout collation that lines response log-probs up with the engine's tokens."""

from __future__ import annotations

import pytest
import torch

from rayapp.models.io import load_causal_lm
from rayapp.teachers.weight_sync import policy_state_dict


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def test_plain_model_state_is_its_hf_state_dict(tiny_lm):
    from rayapp.models.value_head import CausalLMWithValueHead

    wrapped = CausalLMWithValueHead(tiny_lm)
    state = policy_state_dict(wrapped)
    assert set(state) == set(tiny_lm.state_dict())
    assert not any("value_head" in k for k in state)


def test_lora_state_is_merged_and_training_continues_unmerged(tiny_model_dir):
    from rayapp.config.base import AdapterConfig
    from rayapp.models.lora import apply_lora

    base = load_causal_lm(tiny_model_dir)
    names = set(base.state_dict())
    peft_model = apply_lora(base, AdapterConfig(rank=4))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    state = policy_state_dict(peft_model)
    assert set(state) == names  # HF names, no lora_ / base_layer keys
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # unmerged again
    merged = peft_model.merge_and_unload().state_dict()
    for k in names:
        torch.testing.assert_close(state[k], merged[k])
    changed = [k for k in names if "q_proj" in k and not torch.equal(state[k], load_causal_lm(tiny_model_dir).state_dict()[k])]
    assert changed


def test_collate_rollouts_labels_only_response_tokens():
    from rayapp.training.rlhf_rollout import collate_rollouts

    rollouts = [
        {"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "score": 1.0},
        {"prompt_ids": [5], "response_ids": [10, 11, 12], "score": 0.0},
    ]
    b = collate_rollouts(rollouts, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 10, 11, 12, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["scores"].tolist() == [1.0, 0.0]
