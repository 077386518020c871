"""`kind: dataset` — build a task's data offline: a labeled set, an unlabeled pool, a test set."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rayapp.config.base import StrictModel


class SplitSizes(StrictModel):
    train: int = Field(200, ge=0, description="Labeled examples (input, label, gold rationale).")
    unlabeled: int = Field(200, ge=0, description="Inputs without labels, for the teacher to label.")
    test: int = Field(100, ge=0, description="Held-out labeled examples for evaluation.")


class DatasetJobConfig(StrictModel):
    kind: Literal["dataset"] = Field("dataset", description="Job kind.")
    name: str = Field("dataset", description="Job name.")
    source: Literal["reasoning_gym"] = Field("reasoning_gym", description="Generator of the task (offline, seeded).")
    dataset: str = Field("chain_sum", description="reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic, gsm_symbolic.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the reasoning-gym dataset (e.g. min_terms, max_digits).")
    sizes: SplitSizes = Field(default_factory=SplitSizes, description="Examples per split; the splits never share a question.")
    seed: int = Field(0, description="Generator seed; the same seed gives byte-identical files.")
    output_dir: str = Field("outputs/dataset", description="Where train.jsonl, train_cot.jsonl, unlabeled.jsonl, test.jsonl go.")
