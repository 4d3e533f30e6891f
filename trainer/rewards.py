"""Rule-based rewards for verifiable tasks, and loading a user's reward function named in the
config as `module:function`.

A reward function is called once per rollout batch with keyword arguments

    fn(prompts=[str], completions=[str], prompt_ids=[[int]], completion_ids=[[int]],
       references=[str | None], **reward_kwargs) -> list[float]

(texts decoded with the run's tokenizer, or None when the config names only its fingerprint;
`references` is the `prompts` contract's optional reference answer) and returns one float per
completion. Functions take what they need and `**_` for the rest.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from kiln.errors import ConfigError

RewardFunction = Callable[..., Sequence[float]]


def token_fraction(*, completion_ids: Sequence[Sequence[int]], token_ids: Sequence[int],
                   **_: Any) -> list[float]:
    """Share of each completion's tokens that are in `token_ids` (0 for an empty completion)."""
    wanted = set(token_ids)
    return [sum(t in wanted for t in ids) / len(ids) if len(ids) else 0.0
            for ids in completion_ids]


def id_range_fraction(*, completion_ids: Sequence[Sequence[int]], low: int, high: int,
                      **_: Any) -> list[float]:
    """Share of each completion's tokens with an id in `[low, high)`."""
    return [sum(low <= t < high for t in ids) / len(ids) if len(ids) else 0.0
            for ids in completion_ids]


def exact_match(*, completions: Sequence[str | None], references: Sequence[str | None],
                **_: Any) -> list[float]:
    """1 when the completion, stripped, equals the row's reference answer, else 0."""
    return [float(c is not None and r is not None and c.strip() == r.strip())
            for c, r in zip(completions, references, strict=True)]


def load_reward_function(spec: str, key: str) -> RewardFunction:
    """The callable named `module:function`; `key` is the config key that named it."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(key, f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(key, f"{module_name} has no function {name!r}")
    return fn


INPUTS = ("prompts", "completions", "prompt_ids", "completion_ids", "references")


def check_reward_arguments(fn: RewardFunction, kwargs: dict[str, Any], key: str) -> None:
    """ConfigError naming `key` (the `reward_kwargs` key) when `fn` cannot be called with the
    inputs of a rollout plus `kwargs`: found before any model is built, not after a rollout."""
    clash = sorted(set(kwargs) & set(INPUTS))
    if clash:
        raise ConfigError(key, f"{clash[0]!r} is an input every call passes; use another name")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no Python signature (a builtin): the first call checks it
        return
    try:
        signature.bind(**dict.fromkeys(INPUTS, []), **kwargs)
    except TypeError as exc:
        raise ConfigError(key, f"{getattr(fn, '__name__', fn)}: {exc}") from None


def reads_references(fn: RewardFunction) -> bool:
    """Whether `fn` names `references` among its parameters (a rule checking answers)."""
    try:
        return "references" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_reward_function(fn: RewardFunction, n: int, key: str, **inputs: Any) -> list[float]:
    """`fn(**inputs)`, checked: exactly `n` finite floats."""
    values = fn(**inputs)
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(key, f"reward function returned {type(values).__name__}, expected a "
                          "list of floats") from None
    if len(out) != n:
        raise ConfigError(key, f"reward function returned {len(out)} values for {n} completions")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(key, "reward function returned a NaN or infinite reward")
    return out
