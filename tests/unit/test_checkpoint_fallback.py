"""A damaged newest checkpoint: the loop resumes from the previous complete one, with a warning
naming the damaged one (rayapp.training.checkpoint.select_checkpoint, LocalReporter)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rayapp.config.base import TrainConfig
from rayapp.data.readers import read_jsonl
from rayapp.training.checkpoint import CheckpointUnreadable, checkpoint_problem, select_checkpoint
from rayapp.training.loop import LocalReporter, count_supervised, fit
from rayapp.training.sft import sft_loss
from tests.unit.test_loop import _collate, _examples


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _runner(model_dir, root, metrics):
    from rayapp.models.io import load_causal_lm

    items = _examples(16, 1000)

    def run(steps: int):
        torch.manual_seed(0)
        m = load_causal_lm(str(model_dir))
        cfg = TrainConfig(global_batch_size=8, micro_batch_size=4, learning_rate=1e-3, max_steps=steps, checkpoint_every=2)
        return fit(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-3), train_items=items, val_items=None,
                   collate=_collate, count_fn=count_supervised, loss_fn=sft_loss, cfg=cfg, micro_batch_size=4,
                   reporter=LocalReporter(root), metrics_path=metrics)

    return run


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    """One run of 6 steps with checkpoints at 2, 4 and 6, shared by the tests (each takes a copy)."""
    d = tmp_path_factory.mktemp("first_run")
    _runner(tiny_model_dir, d / "ckpt", d / "metrics.jsonl")(6)
    return d


@pytest.fixture()
def trained(first_run, tiny_model_dir, tmp_path):
    """A copy of the first run; returns (run(max_steps), its checkpoints directory, its metrics.jsonl)."""
    shutil.copytree(first_run, tmp_path / "run")
    root, metrics = tmp_path / "run" / "ckpt", tmp_path / "run" / "metrics.jsonl"
    return _runner(tiny_model_dir, root, metrics), root, metrics


@pytest.mark.parametrize("damage", ["__0_0.distcp", ".metadata", "state.pt", "meta.json", "missing shard"])
def test_damaged_newest_checkpoint_is_passed_with_a_warning(trained, damage, capfd):
    run, root, metrics = trained
    newest = root / "step_000006"
    assert checkpoint_problem(newest) is None
    if damage == "missing shard":
        (newest / "__0_0.distcp").unlink()
    else:
        _truncate(newest / damage)
    assert checkpoint_problem(newest) is not None
    capfd.readouterr()
    result = run(8)
    err = capfd.readouterr().err
    assert result.resumed_from == 4
    assert f"checkpoint {newest} is unreadable (" in err and f"resuming from {root / 'step_000004'}" in err, err
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 9))


def test_every_checkpoint_damaged_is_an_error_naming_them(trained):
    run, root, _ = trained
    for step in (2, 4, 6):
        _truncate(root / f"step_{step:06d}" / "__0_0.distcp")
    with pytest.raises(CheckpointUnreadable, match=r"step_000006 \(shard __0_0.distcp has \d+ bytes.*step_000002") as e:
        run(8)
    assert f"Remove {root}" in str(e.value)


def test_select_checkpoint_takes_the_first_complete_one_newest_first(trained):
    _, root, _ = trained
    (root / "step_000006" / "state.pt").write_bytes(b"")
    (root / "step_000004" / "meta.json").write_text("{\"step\": ")
    warnings: list[str] = []
    reporter = LocalReporter(root)
    assert reporter.checkpoint_candidates() == [str(root / f"step_{s:06d}") for s in (6, 4, 2)]
    chosen = select_checkpoint(((p, p) for p in reporter.checkpoint_candidates()), warn=warnings.append)
    assert chosen.path == str(root / "step_000002")
    assert [name for name, _ in chosen.passed] == [str(root / "step_000006"), str(root / "step_000004")]
    assert len(warnings) == 2 and all(w.endswith(f"resuming from {root / 'step_000002'}") for w in warnings)
    assert "state.pt" in warnings[0] and "meta.json" in warnings[1]
    assert select_checkpoint([]) is None


def test_a_copy_cut_short_before_meta_json_is_no_candidate(tmp_path):
    # LocalReporter copies meta.json last: a step directory without one is no checkpoint yet.
    (tmp_path / "step_000002").mkdir()
    (tmp_path / "step_000002" / "__0_0.distcp").write_bytes(b"x")
    assert LocalReporter(tmp_path).latest_checkpoint() is None
    (tmp_path / "step_000002" / "meta.json").write_text(json.dumps({"step": 2, "format": "rayapp-ckpt-v2"}))
    assert checkpoint_problem(tmp_path / "step_000002") is None  # another format: load_checkpoint explains it


def test_a_checkpoint_of_another_model_is_refused_with_what_to_do(tmp_path):
    """Resuming into a changed model (a student with other layers, say) names the checkpoint, the
    key that differs and what to do, instead of DCP's bare "Missing key in checkpoint state_dict"."""
    from rayapp.training.checkpoint import CheckpointFormatError, load_checkpoint, save_checkpoint

    def model_and_opt(layers: int):
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])
        return m, torch.optim.AdamW(m.parameters())

    m2, o2 = model_and_opt(2)
    m2(torch.ones(1, 4)).sum().backward()
    o2.step()
    saved = tmp_path / "checkpoints" / "step_000001"
    shutil.copytree(save_checkpoint(m2, o2, 1, 1, None, rank=0), saved)
    m_again, o_again = model_and_opt(2)
    assert load_checkpoint(str(saved), m_again, o_again) == (1, 1)   # the same model resumes
    m3, o3 = model_and_opt(3)
    with pytest.raises(CheckpointFormatError, match=r"step_000001 was written for another model than this job's \(.*2\.weight.*\)"
                                                    r".*new output_dir, or remove .*checkpoints to start over"):
        load_checkpoint(str(saved), m3, o3)
