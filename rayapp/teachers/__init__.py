"""Teachers: the Generator protocol, the vLLM actor pool that implements it
(``rayapp.teachers.pool``), weight updates of its engines (``weight_sync``), rationale templates
and parsers, and the ``kind: batch`` recipe, the one path that produces teacher rationales.

Importing this package loads neither ray nor vllm; the pool imports them when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# finish_reason values the pool adds to vLLM's own ("stop", "length", "abort"): a prompt that
# was never sent to the engine, with why. The completion is empty and `error` says what to do.
EMPTY_PROMPT = "empty_prompt"
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass
class Completion:
    """One generated sequence for the prompt at ``prompt_index`` in the request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per generated token: top-k (+ the sampled one)
    prompt_index: int = 0
    sample_index: int = 0  # 0..n-1 when sampling.n > 1
    prompt_tokens: int = 0
    error: str | None = None  # set when the prompt was not generated (empty, too long)

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Generator(Protocol):
    """What distillation and RL need from a teacher / rollout engine."""

    def generate(self, prompts: list[str] | list[list[dict]], sampling: Any) -> list[Completion]: ...

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[list[float]] | list[list[dict[int, float]]]: ...

    def update_weights(self, state: Any) -> float: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


__all__ = ["Completion", "EMPTY_PROMPT", "Generator", "PROMPT_TOO_LONG"]
