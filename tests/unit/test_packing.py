"""train.packing: packed rows give the unpacked batch's losses and gradients (1e-5), for SFT and the
distillation losses that take it; the model check refuses attention that crosses examples; the
config refuses the kinds and methods packing does not fit."""

from __future__ import annotations

import random

import pytest
import torch

from rayapp.algorithms import IGNORE_INDEX
from rayapp.config.loader import ConfigError, load_job_dict
from rayapp.data.collate import collate_sft
from rayapp.data.packing import PackingNotHonoured, check_packing_honoured, collate_packed, pack_bins
from rayapp.data.tokenize import Encoded
from rayapp.training.distill.data import DistillItem, collate_distill
from rayapp.training.loop import count_supervised


def test_bins_are_few_balanced_and_within_capacity():
    lengths = [5, 9, 3, 7, 2, 6, 10]
    bins = pack_bins(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert max(fills) <= 12 and len(bins) == 4  # 42 tokens need at least 4 rows of 12
    assert all(b == sorted(b) for b in bins)
    assert max(fills) - min(fills) <= 3  # balanced: the batch pads to the longest row
    assert pack_bins([30, 30, 20], 64) == [[0, 2], [1]]  # rows of 50 and 30, not 60 and a row of 20
    assert pack_bins([20, 3], 12) == [[0], [1]]  # an over-long one gets a row of its own


def test_layout_restarts_positions_and_hides_first_tokens():
    a, b, c = Encoded([5, 6, 7], [5, 6, 7]), Encoded([8, 9], [IGNORE_INDEX, 9]), Encoded([4], [4])
    batch = collate_packed([a, b, c], pad_id=0, capacity=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0], [1, 1, 2]]
    # every example's first label is hidden: nothing before it belongs to the same example
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert "attention_mask" not in batch
    tail = collate_packed([a, b], pad_id=0, capacity=4)  # 5 tokens: two rows, the short one padded
    assert tail["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert tail["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # the padding is a block of its own
    assert tail["segment_ids"].tolist() == [[0, 0, 0], [1, 1, -1]]


def _examples(n: int, seed: int = 0, vocab: int = 200) -> list[Encoded]:
    """Uneven examples with a masked prompt, and some fully supervised (text) ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, answer = rng.randint(1, 12), rng.randint(1, 20)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + answer)]
        labels = list(ids) if i % 3 == 0 else [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Encoded(ids, labels))
    return out


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from rayapp.models.io import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_dir), "float32")
    model.eval()  # dropout off: the two passes must see the same function
    return model


def _loss_and_grads(model, loss_fn, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    parts = loss_fn(model, batch)
    parts.loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(parts.loss_sum.detach()), parts.count, grads


def _assert_same(a, b):
    (la, na, ga), (lb, nb, gb) = a, b
    assert na == nb
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-5)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_sft_loss_and_gradients_equal_unpacked(tiny_lm):
    from rayapp.training.sft import sft_loss

    examples = _examples(7)
    plain, packed = collate_sft(examples, pad_id=0), collate_packed(examples, pad_id=0, capacity=48)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()  # the point: fewer tokens computed
    assert count_supervised(packed) == count_supervised(plain)
    _assert_same(_loss_and_grads(tiny_lm, sft_loss, plain), _loss_and_grads(tiny_lm, sft_loss, packed))


def test_step_by_step_tasks_stay_apart_when_packed(tiny_lm):
    from rayapp.training.distill.step_by_step import loss

    items = [DistillItem(e.input_ids, e.labels, is_rationale=i % 2 == 1) for i, e in enumerate(_examples(8, seed=1))]
    loss_fn = loss(alpha=0.3, p_label=0.4, p_rationale=0.6)
    tiny_lm.train()  # the training branch (two tasks); the tiny model has no dropout
    try:
        plain, packed = collate_distill(items, 0), collate_distill(items, 0, capacity=64)
        assert packed["is_rationale"].shape == packed["input_ids"].shape
        _assert_same(_loss_and_grads(tiny_lm, loss_fn, plain), _loss_and_grads(tiny_lm, loss_fn, packed))
    finally:
        tiny_lm.eval()


def test_teacher_topk_lands_on_its_tokens(tiny_lm):
    from rayapp.config.distill import LogitsConfig
    from rayapp.training.distill.logits import loss

    g = torch.Generator().manual_seed(3)
    items = []
    for e in _examples(6, seed=2):
        n, k = len(e.input_ids) - 1, 4
        ids = torch.randint(3, 200, (n, k), generator=g)
        lps = torch.log_softmax(torch.randn(n, k, generator=g), -1)
        items.append(DistillItem(e.input_ids, e.labels, topk_ids=ids.tolist(), topk_logprobs=lps.tolist()))
    loss_fn = loss(LogitsConfig(ce_weight=0.5))
    plain, packed = collate_distill(items, 0), collate_distill(items, 0, capacity=40)
    assert packed["input_ids"].shape[0] < len(items)
    _assert_same(_loss_and_grads(tiny_lm, loss_fn, plain), _loss_and_grads(tiny_lm, loss_fn, packed))


def test_model_check_accepts_the_tiny_llama_and_refuses_leaky_attention(tiny_lm):
    check_packing_honoured(tiny_lm)

    class IgnoresPositions(torch.nn.Module):  # a model whose attention sees the whole row
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    with pytest.raises(PackingNotHonoured, match="train.packing: false"):
        check_packing_honoured(IgnoresPositions(tiny_lm))


def test_config_refuses_packing_where_examples_are_whole_sequences():
    base = {"model": {"path": "tiny"}, "train": {"packing": True}}
    assert load_job_dict({"kind": "sft", **base}).train.packing
    assert load_job_dict({"kind": "distill", "method": "logits", "teacher": {"path": "tiny"}, **base}).train.packing
    with pytest.raises(ConfigError, match=r"train\.packing.*kind: dpo"):
        load_job_dict({"kind": "dpo", **base})
    with pytest.raises(ConfigError, match=r"train\.packing.*method: relations"):
        load_job_dict({"kind": "distill", "method": "relations", "teacher": {"path": "tiny"}, **base})
