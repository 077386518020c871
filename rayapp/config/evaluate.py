"""`kind: evaluate` — answer accuracy, prompt tokens and latency per request of several models on one held-out set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayapp.config.base import StrictModel, TaskType


class EvalModelConfig(StrictModel):
    name: str = Field(..., description="Row label in the comparison table.")
    path: str = Field(..., description="Model directory or built-in name.")
    prefix: str = Field("", description="Task prefix put before the question (e.g. 'predict: ' for a step-by-step student).")
    few_shot: int = Field(0, ge=0, description="Worked examples from evaluate.few_shot_file put before the question (prompting instead of tuning).")
    extract: Literal["answer", "rationale", "auto"] = Field("auto", description="Read the answer from the first line, from 'So the answer is X', or either.")
    max_new_tokens: int = Field(64, gt=0, description="Greedy tokens generated per question.")


class EvaluateJobConfig(StrictModel):
    kind: Literal["evaluate"] = Field("evaluate", description="Job kind.")
    name: str = Field("evaluate", description="Job name.")
    data: str = Field("data/reasoning/test.jsonl", description="Held-out file of {input_text, output_text: gold label}.")
    task_type: TaskType = Field("number", description="Answer matcher: numbers compare numerically, choices by letter, yes/no by the first word, free text case-, punctuation- and article-insensitively.")
    max_examples: int | None = Field(None, gt=0, description="Evaluate on the first N rows only.")
    few_shot_file: str | None = Field(None, description="{input_text, output_text} worked examples for few-shot prompts.")
    models: list[EvalModelConfig] = Field(default_factory=list, description="Models to compare.")
    latency_samples: int = Field(8, ge=0, description="Questions sent one at a time to measure latency per request.")
    select_best: list[str] = Field(default_factory=list, description="Names among which the most accurate becomes output_dir/best_model.")
    output_dir: str = Field("outputs/evaluate", description="Where eval.json, report.html and best_model go.")

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("models: give at least one model to evaluate")
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        unknown = [n for n in self.select_best if n not in names]
        if unknown:
            raise ValueError(f"select_best: {unknown} are not in models ({names})")
        if any(m.few_shot for m in self.models) and not self.few_shot_file:
            raise ValueError("models[].few_shot is set but evaluate.few_shot_file is not; give a file of worked examples")
        return self
