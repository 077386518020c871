"""Fields every training job shares (sft, distill, reward_model, rlhf, dpo): the model, data,
optimisation, LoRA adapter, Ray Train resources, output directory and deployment of the result."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from rayapp.config.base import (
    REPORT_TO_DESCRIPTION,
    AdapterConfig,
    DataConfig,
    DeployConfig,
    ModelConfig,
    ReportTo,
    ResourcesConfig,
    StrictModel,
    TrainConfig,
    check_precision,
)


class TrainingJobConfig(StrictModel):
    """Fields every training job shares (sft, distill, reward_model, rlhf, dpo)."""

    name: str = Field("job", description="Job name; used in logs, the report and as the served model name.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to tune.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    adapter: AdapterConfig | None = Field(None, description="LoRA adapter settings; omit for full tuning.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray Train workers and devices.")
    output_dir: str = Field("outputs/job", description="Where the job writes model/, checkpoints/, metrics.jsonl, report.html.")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Serve the result when the job succeeds.")
    report_to: ReportTo = Field(default_factory=list, description=REPORT_TO_DESCRIPTION)

    @model_validator(mode="after")
    def _check_batch(self):
        t, r = self.train, self.resources
        per_step = t.micro_batch_size * r.num_workers
        if t.global_batch_size % per_step != 0:
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x resources.num_workers ({r.num_workers}) = {per_step}; "
                f"gradient accumulation is derived from the three"
            )
        check_precision(self.model, t, r.use_gpu)
        if self.report_to and "://" in self.output_dir:
            raise ValueError(
                f"report_to: {self.report_to} needs output_dir on a local path or a shared mount (the driver follows "
                f"output_dir/metrics.jsonl while training runs); {self.output_dir} is a URI: use a mount, or run "
                f"`rayapp track DIR --to ...` on a copy of the job's output afterwards"
            )
        if self.train.packing and (why := self.packing_refusal()):
            raise ValueError(f"train.packing: true is not supported here: {why}; set train.packing: false")
        if self.data.validation_split and self.data.validation:
            raise ValueError("data.validation and data.validation_split are both set; give a validation file or a split, not both")
        return self

    def packing_refusal(self) -> str | None:
        """Why ``train.packing`` does not apply to this job (None: it does). Kinds whose examples are
        single causal-LM sequences with per-token losses override it."""
        return (f"kind: {getattr(self, 'kind', '?')} scores whole sequences (preference pairs, rollouts); packing applies to "
                "kind: sft and kind: distill")

    def planned_steps(self, rows: int | None = None) -> int | None:
        """Optimizer steps the job will take (``rayapp plan``): train.max_steps, else ``rows`` training
        examples x train.epochs / train.global_batch_size (the loop's count); None when unknown.
        Kinds that count iterations override it."""
        if self.train.max_steps:
            return self.train.max_steps
        if rows is None:
            return None
        return max(1, math.ceil(rows * self.train.epochs / self.train.global_batch_size))

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.resources.num_workers)
