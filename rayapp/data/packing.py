"""Sequence packing (``train.packing: true``): a micro-batch's examples laid end to end in rows.

Unpacked, a micro-batch is padded to its longest example, so on uneven data (short answers next to
long rationales or chat turns) much of every forward is spent on padding. Packed, the examples are
placed first-fit-decreasing into rows of at most ``capacity`` tokens (``model.max_seq_len``), and
the batch is those rows padded to the longest row.

Equivalence with the unpacked batch, which ``tests/unit/test_packing.py`` checks to 1e-5 on losses
and gradients:

- attention never crosses examples: ``position_ids`` restart at 0 at every example and the batch
  carries no 2D ``attention_mask`` (and the forward no KV cache), so transformers builds a block-diagonal causal mask from the
  position ids (``masking_utils.find_packed_sequence_indices``; SDPA on CPU, the varlen path of
  flash attention on GPU). A row's padding tail gets positions of its own, so it is a separate
  block that nothing attends to;
- nothing predicts an example's first token: its label is IGNORE_INDEX (unpacked, the causal
  shift drops position 0; packed, the token before it is the previous example's last one);
- the loss is a sum over supervised tokens divided by the step's global count (training/loop.py),
  which packing does not change.

``segment_ids`` (R, L) says which example of the micro-batch each token belongs to (-1: padding),
so per-example values (step-by-step's task flag) become per-token values.

:func:`check_packing_honoured` runs once per worker before training: a model whose attention
ignores ``position_ids`` would attend across examples, and training would silently differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rayapp.algorithms import IGNORE_INDEX


class Tokens(Protocol):
    input_ids: list[int]
    labels: list[int]


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into as few rows of at most ``capacity`` tokens as the
    greedy finds, balanced so the longest row (what the batch is padded to) is short: with R rows
    (from ceil(total / capacity) up), each example, longest first, goes to the row holding the
    fewest tokens; R grows until every row fits. Each row lists its indices in input order. A
    length over ``capacity`` gets a row of its own."""
    import math

    if not lengths:
        return []
    capacity = max(capacity, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for rows in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths) + 1):
        bins: list[list[int]] = [[] for _ in range(rows)]
        fill = [0] * rows
        for i in order:
            r = min(range(rows), key=lambda k: (fill[k], k))
            bins[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= capacity:
            break
    return [sorted(b) for b in bins if b]


def collate_packed(examples: Sequence[Tokens], pad_id: int, capacity: int) -> dict:
    """``input_ids``, ``labels``, ``position_ids`` and ``segment_ids`` as (R, L) int64 tensors, R
    rows of packed examples (see the module docstring), L the longest row; ``example_starts``
    (N, 2): where each example begins (row, column). No ``attention_mask``:
    the position ids carry the example boundaries (use :func:`lm_inputs` to call the model)."""
    import torch

    if not examples:
        raise ValueError("collate_packed: empty batch")
    bins = pack_bins([len(e.input_ids) for e in examples], capacity)
    longest = max(sum(len(examples[i].input_ids) for i in b) for b in bins)
    R = len(bins)
    input_ids = torch.full((R, longest), pad_id, dtype=torch.long)  # (R, L)
    labels = torch.full((R, longest), IGNORE_INDEX, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((R, longest), dtype=torch.long)  # (R, L)
    segment_ids = torch.full((R, longest), -1, dtype=torch.long)  # (R, L)
    starts = torch.zeros((len(examples), 2), dtype=torch.long)  # (N, 2): each example's (row, first column)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            e = examples[i]
            n = len(e.input_ids)
            input_ids[r, at : at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(e.labels, dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # predicted from the previous example's last token otherwise
            position_ids[r, at : at + n] = torch.arange(n)
            segment_ids[r, at : at + n] = i
            starts[i, 0], starts[i, 1] = r, at
            at += n
        position_ids[r, at:] = torch.arange(longest - at)  # the padding tail: a block of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
            "example_starts": starts}


def per_token(values, segment_ids, fill=0):
    """A per-example tensor (N, ...) spread over a packed batch's tokens: (R, L, ...), ``fill``
    on padding."""
    import torch

    out = values[segment_ids.clamp(min=0)]
    pad = (segment_ids < 0).reshape(segment_ids.shape + (1,) * (values.dim() - 1))
    return torch.where(pad, torch.as_tensor(fill, dtype=values.dtype), out)


def lm_inputs(batch: dict) -> dict:
    """The keyword arguments of a causal LM's forward for a batch, packed or not."""
    if "position_ids" in batch:  # no KV cache: transformers only reads packed rows from position ids without one
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class PackingNotHonoured(RuntimeError):
    pass


def check_packing_honoured(model, device="cpu", atol: float = 1e-3) -> None:
    """Raise :class:`PackingNotHonoured` unless ``model`` gives the same logits for two short
    sequences packed in one row as for each alone. Every rank calls it (under FSDP2 the forwards
    are collectives); it costs three forwards of a few tokens."""
    import torch

    a, b = [5, 6, 7, 8], [9, 10, 11]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**lm_inputs({"input_ids": torch.tensor([a + b], device=device),
                                        "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)}))
            alone = [model(input_ids=torch.tensor([s], device=device), attention_mask=torch.ones((1, len(s)), dtype=torch.long, device=device))
                     for s in (a, b)]
    finally:
        model.train(was_training)
        # FSDP2 leaves the root's parameters gathered after a forward without backward; the
        # optimizer built next must see the sharded ones.
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def logits(out):
        return (out[0] if isinstance(out, tuple) else out.logits).float()

    got, want = logits(packed)[0], torch.cat([logits(o)[0] for o in alone])
    gap = float((got - want).abs().max())
    if gap > atol:
        name = type(getattr(model, "module", model)).__name__
        raise PackingNotHonoured(
            f"train.packing: this model ({name}) attends across the examples of a packed row: its logits differ by "
            f"{gap:.3g} from the same sequences run alone. Its attention ignores restarted position_ids (the mask "
            "transformers builds for packed rows); set train.packing: false for this model")
