"""Shared fixtures: one local Ray cluster per test session, the tiny model built once."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep every test offline and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    """A TCP port nothing listens on now (for a Serve proxy or a Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The locally built tiny Llama (random weights), as a Hugging Face directory."""
    from rayapp.models.io import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rayapp.models.io import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster for the whole session (8 logical CPUs on 2 cores)."""
    os.environ.pop("RAY_ADDRESS", None)
    from rayapp.runtime import ensure_ray

    ray = ensure_ray()
    yield ray
    ray.shutdown()
