"""`kind: evaluate` — answer accuracy (with its 95% interval), prompt tokens and latency per request of
several models on one held-out set, and the claims a comparison makes about them, each checked."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayapp.config.base import EngineConfig, StrictModel, TaskType


class EvalModelConfig(StrictModel):
    name: str = Field(..., description="Row label in the comparison table.")
    path: str = Field(..., description="Model directory or built-in name.")
    prefix: str = Field("", description="Task prefix put before the question (e.g. 'predict: ' for a step-by-step student).")
    few_shot: int = Field(0, ge=0, description="Worked examples from evaluate.few_shot_file put before the question (prompting instead of tuning).")
    extract: Literal["answer", "rationale", "auto"] = Field("auto", description="Read the answer from the first line, from 'So the answer is X', or either.")
    max_new_tokens: int = Field(64, gt=0, description="Greedy tokens generated per question.")
    max_examples: int | None = Field(
        None, gt=0, description="Answer only the first N held-out questions (a costly baseline); the table shows each model's n "
                                "and its interval widens accordingly. Default: every question (evaluate.max_examples).")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="How the held-out answers are generated: batched transformers `generate` in the evaluate "
                                    "process (cheap for tiny models), or a vLLM engine (evaluate.engine; worth its start-up for "
                                    "a bigger model or long few-shot prompts). Latency per request is measured the same way "
                                    "for every model either way.")


Metric = Literal["accuracy", "prompt_tokens", "latency"]


class ClaimConfig(StrictModel):
    """One comparison the evaluation checks and prints: ``model``'s ``metric`` against ``versus``'s."""

    model: str = Field(..., description="The model the claim is about (a models[].name).")
    versus: str = Field(..., description="The model it is compared with (a models[].name).")
    metric: Metric = Field("accuracy", description="accuracy, prompt_tokens (per request) or latency (seconds per request).")
    ratio_at_least: float | None = Field(None, gt=0, description="Claim: model / versus >= this (e.g. 0.8 of the teacher's accuracy).")
    ratio_at_most: float | None = Field(None, gt=0, description="Claim: model / versus <= this (e.g. 0.2 of the prompt tokens).")
    margin_at_least: float | None = Field(None, description="Claim: model - versus >= this (e.g. 0.10 more accuracy).")
    otherwise: str = Field("", description="Printed under the claim when it does not hold: what the numbers mean, where it does hold.")

    @model_validator(mode="after")
    def _one_bound(self):
        bounds = [b for b in (self.ratio_at_least, self.ratio_at_most, self.margin_at_least) if b is not None]
        if len(bounds) != 1:
            raise ValueError("claims[]: give exactly one of ratio_at_least, ratio_at_most, margin_at_least")
        return self


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
    claims: list[ClaimConfig] = Field(default_factory=list, description="Comparisons checked against the measured table and printed under it, met or not.")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_model_len=512), description="The vLLM engine for models with backend: vllm.")
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
        for c in self.claims:
            missing = [n for n in (c.model, c.versus) if n not in names]
            if missing:
                raise ValueError(f"claims: {missing} are not in models ({names})")
        if any(m.few_shot for m in self.models) and not self.few_shot_file:
            raise ValueError("models[].few_shot is set but evaluate.few_shot_file is not; give a file of worked examples")
        return self
