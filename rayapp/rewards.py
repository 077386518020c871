"""Rule-based rewards for RL, and loading user reward functions by import path.

A reward function is ``f(completion: str, row: dict, **args) -> float``: ``completion`` is the
generated text, ``row`` the prompt row's other keys (``answer``, ``label``, ...) plus ``prompt``
(the rendered prompt text). Built-ins live in ``REWARD_FUNCTIONS``; anything else in the config
is ``package.module:function``. ``build_reward(specs)`` turns the config's list into one callable
returning the weighted sum and the per-term values (reported as metrics).

Plain Python: no torch, ray or transformers.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from rayapp.errors import UserError

RewardFn = Callable[..., float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
DEFAULT_ANSWER_PATTERN = r"answer is\s*(-?\d+(?:\.\d+)?)"
DEFAULT_FORMAT_PATTERN = r"^\s*-?\d+ [-+*x] -?\d+ = -?\d+\. So the answer is -?\d+\.?\s*$"


class RewardConfigError(UserError, ValueError):
    """A reward named in ``rl.rewards`` that cannot be used."""


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> str | None:
    """The final answer in ``text``: the first group of ``pattern`` (last match), else the last number."""
    matches = re.findall(pattern, text, flags=re.IGNORECASE)
    if matches:
        last = matches[-1]
        return (last if isinstance(last, str) else last[0]).strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def exact_match(completion: str, row: dict, key: str = "answer", pattern: str = DEFAULT_ANSWER_PATTERN) -> float:
    """1.0 when the final answer in ``completion`` equals ``row[key]`` (numbers compared as numbers), else 0.0."""
    if key not in row:
        raise RewardConfigError(
            f"reward 'exact_match' needs the prompt rows to carry '{key}' (found keys: {', '.join(sorted(row)) or 'none'}); "
            f"add it to the data or set args: {{key: FIELD}}"
        )
    got = extract_answer(completion, pattern)
    return 1.0 if got is not None and _same(got, str(row[key])) else 0.0


def format_match(completion: str, row: dict, pattern: str = DEFAULT_FORMAT_PATTERN) -> float:
    """1.0 when the whole completion matches ``pattern`` (a regex), else 0.0."""
    return 1.0 if re.match(pattern, completion, flags=re.DOTALL) else 0.0


def length(completion: str, row: dict, target: int = 40, scale: int = 40) -> float:
    """max(0, 1 - |len - target| / scale) in characters: a smooth reward for a wanted length."""
    return max(0.0, 1.0 - abs(len(completion) - target) / scale)


_CHAIN = re.compile(r"-?\d+(?:\s*[-+*x]\s*-?\d+)+")  # integers only: _NUMBER's leading match is an integer here
_TERM = re.compile(r"([-+*x])\s*(-?\d+)")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*x])\s*(-?\d+)\s*=\s*(-?\d+)")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def chain_steps(completion: str, row: dict, key: str = "prompt") -> float:
    """Process reward for an arithmetic chain question ("4 - 1 - 7 ="): the fraction of its steps
    that ``completion`` works out right, in order, before its first wrong one. The expected steps
    fold the last chain of ``row[key]`` (the rendered prompt by default) left to right ("4 - 1 = 3",
    then "3 - 7 = -4"); the completion's equations "a op b = c" are compared with them one by one.
    A denser signal than :func:`exact_match` (a chain right up to its last step earns part of the
    reward) that cannot be earned by equations unrelated to the question. 0.0 when ``row[key]``
    holds no chain of two or more terms."""
    if key not in row:
        raise RewardConfigError(f"reward 'chain_steps' needs the prompt rows to carry '{key}' (found keys: {', '.join(sorted(row)) or 'none'})")
    chains = _CHAIN.findall(str(row[key]))
    if not chains:
        return 0.0
    first = _NUMBER.match(chains[-1])
    acc = int(first.group())
    expected = []
    for op, term in _TERM.findall(chains[-1][first.end():]):
        nxt = _apply(acc, op, int(term))
        expected.append((acc, op, int(term), nxt))
        acc = nxt
    got = [(int(a), op, int(b), int(c)) for a, op, b, c in _EQUATION.findall(completion)]
    right = 0
    for want, have in zip(expected, got, strict=False):  # a short completion has fewer steps
        if want != have:
            break
        right += 1
    return right / len(expected)


REWARD_FUNCTIONS: dict[str, RewardFn] = {"exact_match": exact_match, "chain_steps": chain_steps, "format": format_match,
                                         "length": length}


def load_reward_function(name: str, where: str = "rl.rewards") -> RewardFn:
    """A built-in name, or 'package.module:function' imported from the Python path."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise RewardConfigError(
            f"{where}: function '{name}' is neither a built-in reward ({', '.join(REWARD_FUNCTIONS)}) "
            "nor an import path 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardConfigError(f"{where}: function '{name}': cannot import module '{module_name}' ({e}); is it on PYTHONPATH?") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardConfigError(f"{where}: function '{name}': module '{module_name}' has no callable '{attr}'")
    return fn


class CombinedReward:
    """Weighted sum of reward terms. Picklable (it keeps names, not functions) so it can travel to workers."""

    def __init__(self, specs: Sequence[Any]):
        self.specs = [(s.function, float(s.weight), dict(s.args)) for s in specs]
        for i, (name, _, _) in enumerate(self.specs):
            load_reward_function(name, f"rl.rewards[{i}].function")  # fail on the driver, before anything starts
        self._fns: list[RewardFn] | None = None

    def __getstate__(self):
        return {"specs": self.specs, "_fns": None}

    @property
    def names(self) -> list[str]:
        return [_metric_name(name) for name, _, _ in self.specs]

    def __call__(self, completion: str, row: dict) -> tuple[float, dict[str, float]]:
        if self._fns is None:
            self._fns = [load_reward_function(name, f"rl.rewards[{i}].function") for i, (name, _, _) in enumerate(self.specs)]
        total, parts = 0.0, {}
        for fn, (name, weight, args), key in zip(self._fns, self.specs, self.names, strict=True):
            try:
                value = float(fn(completion, row, **args))
            except RewardConfigError:
                raise
            except TypeError as e:
                raise RewardConfigError(f"rl.rewards: function '{name}' cannot be called as f(completion, row, **{args}): {e}") from e
            parts[key] = parts.get(key, 0.0) + value
            total += weight * value
        return total, parts


def _metric_name(name: str) -> str:
    return "reward_" + re.sub(r"[^A-Za-z0-9]+", "_", name.split(":")[-1]).strip("_")


def build_reward(specs: Sequence[Any]) -> CombinedReward:
    return CombinedReward(specs)
