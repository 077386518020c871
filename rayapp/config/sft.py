"""`kind: sft` — supervised tuning, full or LoRA, on text / chat / code data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayapp.config.training import TrainingJobConfig


class SFTJobConfig(TrainingJobConfig):
    kind: Literal["sft"] = Field("sft", description="Job kind.")
    name: str = Field("sft", description="Job name; used in logs, the report and as the served model name.")
    output_dir: str = Field("outputs/sft", description="Where the job writes model/, checkpoints/, metrics.jsonl, report.html.")

    def packing_refusal(self) -> str | None:
        return None
