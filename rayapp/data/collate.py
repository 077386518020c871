"""Batch encoded examples into right-padded tensors. torch is imported inside the functions."""

from __future__ import annotations

from collections.abc import Sequence

from rayapp.algorithms import IGNORE_INDEX
from rayapp.data.tokenize import Encoded


def collate_sft(examples: Sequence[Encoded], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` as (B, T) int64 tensors, right-padded.

    Padding positions have ``pad_id`` / 0 / IGNORE_INDEX; T is the longest example, rounded up to
    ``pad_to_multiple_of`` when given."""
    import torch

    if not examples:
        raise ValueError("collate_sft: empty batch")
    longest = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
