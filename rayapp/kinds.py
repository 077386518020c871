"""The one table of job kinds: ``kind:`` -> (its typed config, the module that runs it).

Every recipe module exposes ``run(cfg) -> dict`` (a short summary of what it wrote, printed by
``rayapp run``; :func:`run` calls it inside the job's experiment trackers) and ``validate(cfg) -> str`` (config and data checks without running, returning
the stats text ``rayapp validate`` prints). Both sides are named as strings and imported only
when that kind is loaded or run, so ``import rayapp.config`` stays light.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Kind(NamedTuple):
    config: str  # "module:Class" of the job's pydantic config
    recipe: str  # module with run(cfg) and validate(cfg)


KINDS: dict[str, Kind] = {
    "sft": Kind("rayapp.config.sft:SFTJobConfig", "rayapp.training.sft"),
    "batch": Kind("rayapp.config.batch:BatchJobConfig", "rayapp.teachers.batch"),
    "distill": Kind("rayapp.config.distill:DistillJobConfig", "rayapp.training.distill.recipe"),
    "reward_model": Kind("rayapp.config.rl:RewardModelJobConfig", "rayapp.training.reward_model"),
    "rlhf": Kind("rayapp.config.rl:RLHFJobConfig", "rayapp.training.rlhf"),
    "dpo": Kind("rayapp.config.rl:DPOJobConfig", "rayapp.training.dpo"),
    "deploy": Kind("rayapp.config.deploy:DeployJobConfig", "rayapp.serving.deploy"),
    "pipeline": Kind("rayapp.config.pipeline:PipelineJobConfig", "rayapp.pipeline"),
    "dataset": Kind("rayapp.config.dataset:DatasetJobConfig", "rayapp.data.dataset"),
    "evaluate": Kind("rayapp.config.evaluate:EvaluateJobConfig", "rayapp.evaluation"),
}


def config_class(kind: str):
    """The pydantic class of ``kind``; KeyError for an unknown kind (or one whose module is not shipped)."""
    if kind not in KINDS:
        raise KeyError(kind)
    module, _, cls = KINDS[kind].config.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        raise KeyError(kind) from e


def recipe(kind: str) -> ModuleType:
    """The module that runs ``kind`` (``run(cfg)``, ``validate(cfg)``)."""
    if kind not in KINDS:
        raise KeyError(f"no recipe for job kind '{kind}'")
    return importlib.import_module(KINDS[kind].recipe)


def run(cfg) -> dict:
    """Run a job with its recipe. A job that names experiment trackers (``report_to``, training
    kinds) runs inside them: metrics.jsonl is followed while it trains, the resolved config is the
    runs' parameters, and report.html and eval.json are stored at the end (rayapp.tracking)."""
    from rayapp.console import watch

    module = recipe(cfg.kind)
    watch(cfg.name)  # its "[name] ..." lines reach the terminal when the console is captured
    if not getattr(cfg, "report_to", None):
        return module.run(cfg)
    from rayapp.tracking import check_report_to, track_job

    check_report_to(cfg.report_to)
    with track_job(cfg):
        return module.run(cfg)
