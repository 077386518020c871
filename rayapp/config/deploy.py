"""`kind: deploy` — serve a model directory, or a finished job's output, on Ray Serve."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayapp.config.base import DeployConfig, StrictModel


class DeployJobConfig(StrictModel):
    kind: Literal["deploy"] = Field("deploy", description="Job kind.")
    name: str = Field("model", description="Model name clients send in the `model` field (deploy.name overrides it).")
    model: str = Field(
        "tiny",
        description="A Hugging Face model directory, a built-in name ('tiny', ...), or a job's output_dir "
        "(its model/ is served, or its adapter/ on the base model named in config.resolved.yaml).",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served on the same base model: name -> adapter directory; clients pick one "
        "with `model: NAME`.",
    )
    reward: bool = Field(
        False,
        description="Serve `model` as a reward model (sequence classification head) on /v1/score instead of "
        "as a generator.",
    )
    deploy: DeployConfig = Field(
        default_factory=lambda: DeployConfig(enabled=True),
        description="Endpoint settings: host, port, replicas, API key, context length, devices.",
    )
