"""Scalar heads on a causal LM: the reward model (Bradley-Terry) and the PPO critic.

Reward model: a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1`` built from the
causal LM's directory (the trunk's weights load, the ``score`` head starts fresh). It reads the
hidden state of each row's last non-padding token. That is the format TRL, OpenRLHF and vLLM's
reward/classify runners load, so the exported ``model/`` is served and scored as is.

Critic: :class:`CausalLMWithValueHead` puts a linear value head on the policy's last hidden
states, one value per token (the trunk is shared with the policy, as in TRL's PPOv1 / the
original ``lm-human-preferences``; OpenRLHF uses a separate critic model instead).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def load_reward_model(ref: str | os.PathLike, dtype: str = "float32", adapter=None, pad_token_id: int | None = None):
    """A sequence-classification model with one output from a causal-LM (or reward-model) directory.

    ``adapter`` (an AdapterConfig) wraps it in a LoRA of task SEQ_CLS, which keeps the fresh
    ``score`` head fully trainable."""
    from transformers import AutoModelForSequenceClassification

    from rayapp.models.io import resolve_model, torch_dtype

    path = resolve_model(str(ref))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype(dtype), use_safetensors=True)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if adapter is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, config)
    return model


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each right-padded row. (B, T), (B, T) -> (B,)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def save_reward_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a plain Hugging Face reward model (LoRA merged) into ``out_dir``, atomically."""
    from rayapp.models.io import save_model_atomic

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return save_model_atomic(model, tokenizer, out_dir)


def policy_of(model: nn.Module) -> nn.Module:
    """The causal LM being trained: inside a DDP wrapper and a CausalLMWithValueHead, if any."""
    from rayapp.models.io import unwrap

    inner = unwrap(model)
    return inner.lm if isinstance(inner, CausalLMWithValueHead) else inner


class CausalLMWithValueHead(nn.Module):
    """A causal LM plus ``value_head``: forward returns (logits (B, T, V), values (B, T))."""

    def __init__(self, lm: nn.Module, hidden_size: int | None = None):
        super().__init__()
        self.lm = lm
        hidden = hidden_size or lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]                                   # (B, T, H)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, T)
        return out.logits, values
