"""Invariants of the shared step loop, in one process (no Ray)."""

from __future__ import annotations

import random

import pytest
import torch

from rayapp.config.base import TrainConfig
from rayapp.data.readers import read_jsonl
from rayapp.training.loop import (
    LocalReporter,
    count_supervised,
    fit,
    global_batch_indices,
    lr_lambda,
    total_steps_for,
)
from rayapp.training.sft import sft_loss


def _examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 14)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        split = rng.randint(2, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * split + ids[split:]})
    return out


def _collate(items: list[dict]) -> dict:
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), T), 3, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.fixture()
def fresh_model(tiny_model_dir):
    from rayapp.models.io import load_causal_lm

    def make():
        torch.manual_seed(0)
        return load_causal_lm(str(tiny_model_dir))

    return make


def _run(model, items, micro, steps=1, lr=1e-2, reporter=None, **cfg_kw):
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=micro, learning_rate=lr, max_steps=steps, warmup_ratio=0, max_grad_norm=None, **cfg_kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return fit(
        model=model, optimizer=opt, train_items=items, val_items=None, collate=_collate, count_fn=count_supervised,
        loss_fn=sft_loss, cfg=cfg, micro_batch_size=micro, reporter=reporter or LocalReporter(),
    )


def test_grad_accumulation_1x8_equals_8x1(fresh_model):
    items = _examples(8, 1000)
    a, b = fresh_model(), fresh_model()
    ra = _run(a, items, micro=8)
    rb = _run(b, items, micro=1)
    assert ra.metrics["loss"] == pytest.approx(rb.metrics["loss"], rel=1e-5)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-4, msg=name)


def test_parameters_change_and_seeded_run_reproduces(fresh_model):
    items = _examples(16, 1000)
    m = fresh_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    r1 = _run(m, items, micro=4, steps=3)
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    r2 = _run(fresh_model(), items, micro=4, steps=3)
    assert r1.metrics["loss"] == r2.metrics["loss"]


class _KilledAfter(LocalReporter):
    """A reporter that dies right after the checkpoint of step ``kill_at``, like a killed job."""

    def __init__(self, root, kill_at):
        super().__init__(root)
        self.kill_at = kill_at

    def report(self, metrics, checkpoint_dir):
        if metrics["step"] == self.kill_at:  # dies before this checkpoint is stored
            raise KeyboardInterrupt("killed")
        super().report(metrics, checkpoint_dir)


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(fresh_model, tmp_path):
    items = _examples(16, 1000)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=4, learning_rate=1e-3, max_steps=6, checkpoint_every=2)

    def run(reporter, metrics_path=None):
        m = fresh_model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return fit(model=m, optimizer=opt, train_items=items, val_items=None, collate=_collate,
                   count_fn=count_supervised, loss_fn=sft_loss, cfg=cfg, micro_batch_size=4,
                   reporter=reporter, metrics_path=metrics_path)

    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(_KilledAfter(tmp_path / "ckpt", kill_at=6), metrics)  # dies at step 6; last checkpoint is 4
    resumed = run(LocalReporter(tmp_path / "ckpt"), metrics)
    assert resumed.resumed_from == 4
    steps = [r["step"] for r in read_jsonl(metrics)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 of the killed run were dropped and re-run
    full = run(LocalReporter(tmp_path / "ckpt_full"))
    assert full.metrics["loss"] == pytest.approx(resumed.metrics["loss"], rel=1e-4)


class _StorageFull(LocalReporter):
    """A reporter whose store fails, as a full disk or an unreachable bucket does."""

    def report(self, metrics, checkpoint_dir):
        self.offered = checkpoint_dir
        raise OSError(28, "No space left on device")


def test_a_failed_report_leaves_no_checkpoint_copy_behind(fresh_model, tmp_path):
    import os

    reporter = _StorageFull(tmp_path / "ckpt")
    with pytest.raises(OSError, match="No space left"):
        _run(fresh_model(), _examples(16, 1000), micro=4, steps=2, reporter=reporter, checkpoint_every=1)
    assert reporter.offered and not os.path.exists(reporter.offered)  # the model-sized temporary copy is removed


def test_ema_teacher_state_is_checkpointed_and_restored_on_resume(fresh_model, tmp_path):
    """An EMA copy of the student (self-distillation) changes every step outside model and optimizer:
    a killed-then-resumed run must end with the same EMA weights as an uninterrupted one."""
    from rayapp.training.distill.method import ema_update

    items = _examples(16, 1000)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=4, learning_rate=1e-3, max_steps=6, checkpoint_every=2)

    def run(reporter):
        m, ema = fresh_model(), fresh_model().requires_grad_(False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        opt.register_step_post_hook(lambda *_: ema_update(ema, m, 0.5))
        fit(model=m, optimizer=opt, train_items=items, val_items=None, collate=_collate, count_fn=count_supervised,
            loss_fn=sft_loss, cfg=cfg, micro_batch_size=4, reporter=reporter, extra_modules={"ema_teacher": ema})
        return ema

    with pytest.raises(KeyboardInterrupt):
        run(_KilledAfter(tmp_path / "ckpt", kill_at=6))
    resumed = run(LocalReporter(tmp_path / "ckpt"))
    full = run(LocalReporter(tmp_path / "ckpt_full"))
    start = fresh_model()
    for (name, a), (_, b) in zip(resumed.named_parameters(), full.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)
    assert any(not torch.equal(b, s0) for b, s0 in zip(full.parameters(), start.parameters(), strict=True))  # the EMA moved


def test_data_order_is_a_permutation_per_epoch():
    seen = []
    for step in range(4):
        seen += global_batch_indices(step, 10, 5, seed=3)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(warmup_ratio=0.1, min_lr_ratio=0.1)
    f = lr_lambda(cfg, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1, abs=1e-3)
    assert total_steps_for(TrainConfig(epochs=2, global_batch_size=16), 100) == 13


def test_progress_lines_are_throttled_but_metrics_keep_every_step(fresh_model, tmp_path, capfd, monkeypatch):
    """A job prints about four progress lines (the first step, each third of the run, the last; and
    evaluations), not one line per step; metrics.jsonl has them all."""
    import rayapp.training.loop as loop

    monkeypatch.setattr(loop, "PROGRESS_EVERY_S", 3600.0)
    items = _examples(16, 200)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, learning_rate=1e-3, max_steps=40, warmup_ratio=0, checkpoint_every=100)
    model = fresh_model()
    fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), train_items=items, val_items=None, collate=_collate,
        count_fn=count_supervised, loss_fn=sft_loss, cfg=cfg, micro_batch_size=8, reporter=LocalReporter(),
        metrics_path=tmp_path / "metrics.jsonl", name="quiet")
    lines = [x for x in capfd.readouterr().out.splitlines() if x.startswith("[quiet]")]
    assert [x.split()[1] for x in lines] == ["1/40", "14/40", "27/40", "40/40"], lines
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 41))


def test_a_resumed_run_follows_its_own_schedule(fresh_model, tmp_path):
    """The resume rule of build_optimizer: a re-run with more steps continues from the checkpoint's
    step on the new schedule (not the finished run's decayed one)."""
    items = _examples(16, 1000)

    def cfg(steps):
        return TrainConfig(global_batch_size=8, micro_batch_size=8, learning_rate=1e-3, max_steps=steps, checkpoint_every=2,
                           warmup_ratio=0.0, min_lr_ratio=0.1)

    def run(steps, reporter):
        return fit(model=fresh_model(), train_items=items, val_items=None, collate=_collate, count_fn=count_supervised,
                   loss_fn=sft_loss, cfg=cfg(steps), micro_batch_size=8, reporter=reporter)

    run(4, LocalReporter(tmp_path))
    reporter = LocalReporter(tmp_path)
    assert run(8, reporter).resumed_from == 4
    # reported at step 6: the learning rate of optimizer step 5 (0-based) of the 8-step schedule
    assert [m["step"] for m in reporter.history] == [6, 8]
    assert reporter.history[0]["lr"] == pytest.approx(1e-3 * lr_lambda(cfg(8), 8)(5))
    assert lr_lambda(cfg(8), 8)(5) > lr_lambda(cfg(4), 4)(3)  # not the 4-step run's floor
