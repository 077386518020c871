"""collate_sft: (B, T) right-padded input_ids / attention_mask / labels."""

from __future__ import annotations

import pytest
import torch

from rayapp.data.collate import collate_sft
from rayapp.data.tokenize import Encoded


def test_right_padding_shapes_and_values():
    batch = collate_sft([Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8], truncated=True)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())


def test_pad_to_multiple_and_empty_batch():
    batch = collate_sft([Encoded([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])], pad_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert batch["attention_mask"].sum().item() == 5
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], pad_id=0)
