"""`kind: pipeline` — named stages, each a job of another kind, run in order.

A stage may use an earlier stage's output through ``${stages.NAME.output_dir}`` in any string
field. A stage without ``output_dir`` writes to ``<pipeline output_dir>/<stage name>``. Every stage
is validated when the pipeline loads, so a typo in the last stage fails before the first runs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from rayapp.config.base import StrictModel, TaskType

_REF = re.compile(r"\$\{stages\.([A-Za-z0-9_]+)\.output_dir\}")


class AskConfig(StrictModel):
    stage: str = Field(..., description="A deploy stage whose endpoint gets the question.")
    question: str | None = Field(None, description="Sent as a chat message once the pipeline finishes (or give from_file).")
    from_file: str | None = Field(
        None, description="Instead of question: a held-out file of {input_text, output_text} (may name ${stages.NAME.output_dir}); "
                          "its row `row` is asked, and the answer is printed beside the gold one and checked with task_type's matcher.")
    row: int = Field(0, ge=0, description="Which row of from_file (0: the first).")
    task_type: TaskType = Field("free", description="Answer matcher for from_file's gold answer (as kind: evaluate's).")
    prefix: str = Field("", description="Prepended to the question (e.g. the student's 'predict: ' task prefix).")
    max_tokens: int = Field(32, gt=0, description="Longest answer.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.question is None) == (self.from_file is None):
            raise ValueError("ask: give exactly one of question and from_file")
        return self


class PipelineJobConfig(StrictModel):
    kind: Literal["pipeline"] = Field("pipeline", description="Job kind.")
    name: str = Field("pipeline", description="Pipeline name; used in logs and the summary.")
    output_dir: str = Field("outputs/pipeline", description="Parent of every stage's output directory, and of pipeline.json.")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Ordered stages: name -> a job mapping of any other kind."
    )
    skip_finished: bool = Field(True, description="Skip a stage that finished before with the same config and inputs.")
    only: list[str] | None = Field(None, description="Run just these stages (their inputs must exist).")
    ask: AskConfig | None = Field(None, description="After the stages: ask a deployed model one question over HTTP and print the answer.")

    @model_validator(mode="after")
    def _check_stages(self):
        from rayapp.config.loader import ConfigError, load_job_dict

        if not self.stages:
            raise ValueError("stages: a pipeline needs at least one stage")
        seen: list[str] = []
        problems: list[str] = []
        for name, stage in self.stages.items():
            if not isinstance(stage, dict):
                problems.append(f"stages.{name}: expected a job mapping, found {type(stage).__name__}")
                continue
            if stage.get("kind") == "pipeline":
                problems.append(f"stages.{name}.kind: pipelines do not nest")
                continue
            for ref in _refs(stage):
                if ref not in self.stages:
                    problems.append(f"stages.{name}: refers to ${{stages.{ref}.output_dir}}, but there is no stage '{ref}'")
                elif ref not in seen:
                    problems.append(f"stages.{name}: refers to stage '{ref}', which runs later; reorder the stages")
            try:
                load_job_dict(self.resolved_stage(name), source=f"stages.{name}")
            except ConfigError as e:
                problems.extend(e.problems)
            seen.append(name)
        if self.only:
            unknown = [s for s in self.only if s not in self.stages]
            if unknown:
                problems.append(f"only: unknown stage(s) {unknown}; stages are {list(self.stages)}")
        if self.ask is not None and self.stages.get(self.ask.stage, {}).get("kind") != "deploy":
            problems.append(f"ask.stage: '{self.ask.stage}' is not a deploy stage of this pipeline")
        if self.ask is not None and self.ask.from_file:
            problems += [f"ask.from_file: refers to ${{stages.{ref}.output_dir}}, but there is no stage '{ref}'"
                         for ref in _refs(self.ask.from_file) if ref not in self.stages]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def stage_output_dir(self, name: str) -> str:
        return str(self.stages[name].get("output_dir") or f"{self.output_dir}/{name}")

    def resolved_stage(self, name: str) -> dict:
        """The stage's job mapping with output_dir filled in and ${stages.X.output_dir} substituted."""
        from rayapp.kinds import KINDS, config_class

        stage = dict(self.stages[name])
        fields = config_class(stage["kind"]).model_fields if stage.get("kind") in KINDS else {}
        if "name" in fields:
            stage.setdefault("name", name)
        if "output_dir" in fields or not fields:
            stage["output_dir"] = self.stage_output_dir(name)
        return _substitute(stage, lambda ref: self.stage_output_dir(ref) if ref in self.stages else f"${{stages.{ref}.output_dir}}")

    def ask_file(self) -> str | None:
        """ask.from_file with ${stages.X.output_dir} substituted."""
        if self.ask is None or self.ask.from_file is None:
            return None
        return _substitute(self.ask.from_file, self.stage_output_dir)

    def dependencies(self, name: str) -> list[str]:
        return sorted(set(_refs(self.stages[name])))


def _refs(value) -> list[str]:
    if isinstance(value, str):
        return _REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _substitute(value, lookup):
    if isinstance(value, str):
        return _REF.sub(lambda m: lookup(m.group(1)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, lookup) for v in value]
    return value
