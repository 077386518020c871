"""One recipe per job kind. Each recipe module exposes ``run(cfg) -> dict`` (a summary of what it
wrote) and ``validate(cfg) -> str`` (config + data checks without training, returning stats text)."""

from __future__ import annotations

import importlib

# kind -> module with run(cfg) and validate(cfg). Imported only when that kind runs.
RECIPES: dict[str, str] = {
    "sft": "rayapp.training.sft",
    "batch": "rayapp.teachers.batch",
    "distill": "rayapp.training.distill",
    "reward_model": "rayapp.training.reward_model",
    "rlhf": "rayapp.training.rlhf",
    "dpo": "rayapp.training.dpo",
    "deploy": "rayapp.serving.deploy",
    "pipeline": "rayapp.pipeline",
    "dataset": "rayapp.tasks",
    "evaluate": "rayapp.training.evaluate",
}


def recipe(kind: str):
    if kind not in RECIPES:
        raise KeyError(f"no recipe for job kind '{kind}'")
    return importlib.import_module(RECIPES[kind])
