"""How far a job has got, read from what it writes into its output_dir (`rayapp jobs status`).

A training job appends one row per logged step to ``metrics.jsonl`` (``step``, ``loss`` or, for RL,
``reward_mean`` and ``policy_loss``) and writes ``config.resolved.yaml`` when it starts and
``eval.json`` when it ends. The total number of steps is, in order: the row's ``total_steps``
when the loop records it; ``rl.iterations`` for ``kind: rlhf``; ``train.max_steps``; the
training examples (or pairs) in ``data_stats.json`` x ``train.epochs`` / ``train.global_batch_size``
(the loop's own formula); else estimated from the row's ``epoch`` column (marked ``~``).

A pipeline's stages write into their own directories (``stages.NAME.output_dir``, default
``<output_dir>/NAME``): ``.stage.json`` marks one that succeeded, ``pipeline.json`` (written at the
end, or when a stage fails) has each stage's status. The current stage is the first one neither
succeeded nor skipped.

Plain Python: nothing here imports ray, torch or a tracker. Output directories given as URIs
(``s3://``, ``gs://``) are read through :mod:`rayapp.storage`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StepProgress:
    step: int | None = None
    total: int | None = None
    total_estimated: bool = False
    values: dict[str, float] = field(default_factory=dict)  # loss / val_loss / reward_mean ... of the last row
    finished: bool = False  # eval.json written

    def line(self) -> str:
        if self.step is None:
            return "finished" if self.finished else "no metrics yet"
        total = f"/{'~' if self.total_estimated else ''}{self.total}" if self.total else ""
        parts = [f"step {self.step}{total}"]
        parts += [f"{k} {v:.4g}" for k, v in self.values.items()]
        if self.finished:
            parts.append("finished")
        return ", ".join(parts)


@dataclass
class Progress:
    kind: str | None
    step: StepProgress | None = None  # a training job, or the current stage of a pipeline
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (name, kind, status)
    current: str | None = None  # the stage now running (or the one that failed)

    def lines(self) -> list[str]:
        if not self.stages:
            return [f"progress: {self.step.line() if self.step else 'no metrics yet'}"]
        done = sum(status in ("succeeded", "skipped") for _, _, status in self.stages)
        if self.current is None:
            head = f"stages: {done}/{len(self.stages)} done"
        else:
            i = [n for n, _, _ in self.stages].index(self.current) + 1
            kind = dict((n, k) for n, k, _ in self.stages)[self.current]
            status = dict((n, s) for n, _, s in self.stages)[self.current]
            head = f"stage {i}/{len(self.stages)}: {self.current} ({kind}){' FAILED' if status == 'failed' else ''}"
            if self.step is not None:
                head += f": {self.step.line()}"
        listing = ", ".join(f"{n} {s}" for n, _, s in self.stages)
        return [f"progress: {head}", f"stages: {listing}"]


class _Dir:
    """Read-only access to an output_dir: a local path (nothing is created) or a URI."""

    def __init__(self, root: str):
        self.root = root
        self.uri = "://" in root and not root.startswith("file://")
        self._store = None

    def child(self, path: str) -> _Dir:
        return _Dir(path)

    def text(self, rel: str) -> str | None:
        if not self.uri:
            p = Path(self.root.removeprefix("file://")) / rel
            try:
                return p.read_text()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        from rayapp.storage import StorageError, open_output

        if self._store is None:
            self._store = open_output(self.root, check=False)
        try:
            return self._store.read_text(rel)
        except (StorageError, FileNotFoundError, OSError):
            return None

    def json(self, rel: str):
        text = self.text(rel)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None

    def yaml(self, rel: str) -> dict | None:
        text = self.text(rel)
        if not text:
            return None
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None


def last_row(text: str | None) -> dict | None:
    """The last complete JSON row of a metrics.jsonl being appended to."""
    if not text:
        return None
    lines = text.split("\n")[:-1]  # the part after the last newline is a row still being written
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            return row
    return None


def _examples(stats) -> int | None:
    train = stats.get("train") if isinstance(stats, dict) else None
    for key in ("examples", "pairs", "rows"):
        if isinstance(train, dict) and isinstance(train.get(key), int):
            return train[key]
    return None


def total_steps(row: dict, config: dict | None, stats) -> tuple[int | None, bool]:
    """(total steps, estimated?) of a training job; see the module docstring for the order."""
    if isinstance(row.get("total_steps"), int):
        return row["total_steps"], False
    config = config or {}
    train = config.get("train") or {}
    if config.get("kind") == "rlhf" and isinstance((config.get("rl") or {}).get("iterations"), int):
        return config["rl"]["iterations"], False
    if isinstance(train.get("max_steps"), int):
        return train["max_steps"], False
    epochs, batch = train.get("epochs", 1.0), train.get("global_batch_size")
    n = _examples(stats)
    if n and batch:  # rayapp.training.loop.total_steps_for
        return max(1, math.ceil(epochs * n / batch)), False
    epoch, step = row.get("epoch"), row.get("step")
    if isinstance(epoch, (int, float)) and epoch > 0 and isinstance(step, int):
        per_epoch = step / epoch  # epoch = step * global_batch / examples, rounded to 4 decimals
        value = epochs * per_epoch
        return max(1, round(value) if abs(value - round(value)) < 0.02 * value else math.ceil(value)), True
    return None, False


SHOWN = ("loss", "val_loss", "reward_mean", "policy_loss")


def step_progress(d: _Dir) -> StepProgress:
    p = StepProgress(finished=d.text("eval.json") is not None)
    row = last_row(d.text("metrics.jsonl"))
    if row is None:
        return p
    p.step = row.get("step")
    p.total, p.total_estimated = total_steps(row, d.yaml("config.resolved.yaml"), d.json("data_stats.json"))
    p.values = {k: float(row[k]) for k in SHOWN if isinstance(row.get(k), (int, float))}
    return p


def read_progress(output_dir: str | os.PathLike, config: dict | None = None) -> Progress:
    """Progress of the job writing to ``output_dir``. ``config``: the job's config as a dict, when
    known (a pipeline's stages and their directories); else config.resolved.yaml is read."""
    d = _Dir(os.fspath(output_dir))
    config = config or d.yaml("config.resolved.yaml") or {}
    summary = d.json("pipeline.json") or {}
    stages_cfg = config.get("stages") if config.get("kind") == "pipeline" else None
    if stages_cfg is None and "stages" in summary:
        stages_cfg = {name: {"kind": s.get("kind")} for name, s in summary["stages"].items()}
    if not stages_cfg:
        return Progress(kind=config.get("kind"), step=step_progress(d))
    recorded = summary.get("stages", {})
    stages, current, current_step = [], None, None
    for name, stage in stages_cfg.items():
        stage_dir = d.child(str(stage.get("output_dir") or f"{d.root.rstrip('/')}/{name}"))
        status = (recorded.get(name) or {}).get("status")
        if status is None:
            state = stage_dir.json(".stage.json") or {}
            status = "succeeded" if state.get("status") == "succeeded" else "pending"
        if current is None and status not in ("succeeded", "skipped"):
            current, current_step = name, step_progress(stage_dir)
            if status == "pending" and (current_step.step is not None or stage_dir.text("config.resolved.yaml")):
                status = "running"
        stages.append((name, str(stage.get("kind")), status))
    return Progress(kind="pipeline", stages=stages, current=current, step=current_step)
