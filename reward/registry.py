"""Every reward a GRPO run can use, by name: configs say `rewards: [accuracy, format]` (weights in TRL's
`reward_weights`). Each entry is a factory that takes the run's answer-extraction fallback and returns a function
with TRL's reward signature, f(prompts, completions, **dataset_columns) -> list[float | None].

More rewards: decorate a factory with `@register_reward("name")`. A `module:function` entry imports a reward
function written elsewhere, only when the user allows imports explicitly (`--allow_reward_imports true`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from reward.rewards import format_reward, intermediate_reward, make_accuracy_reward

RewardFunction = Callable[..., list]
REWARDS: dict[str, Callable[[str], RewardFunction]] = {}


class RewardConfigError(ValueError):
    """A reward name or weight in a config cannot be used; the message names it and what exists."""


def register_reward(name: str) -> Callable:
    """Register `factory(fallback) -> reward function` under `name`."""

    def register(factory: Callable[[str], RewardFunction]) -> Callable[[str], RewardFunction]:
        REWARDS[name] = factory
        return factory

    return register


@register_reward("accuracy")
def _accuracy(fallback: str) -> RewardFunction:
    """1 when the final answer equals the gold `answer` under math-verify, else 0."""
    return make_accuracy_reward(fallback=fallback)


@register_reward("format")
def _format(fallback: str) -> RewardFunction:
    """1 when the completion states its final answer as \\boxed{...} or `#### N`."""
    return format_reward


@register_reward("intermediate")
def _intermediate(fallback: str) -> RewardFunction:
    """F1 between the results the completion states (after `=`, `####`) and the reference solution's."""
    return intermediate_reward


def reward_function(name: str, fallback: str = "last_number", allow_imports: bool = False) -> RewardFunction:
    """The reward registered as `name`, or (with `allow_imports`) the function a `module:function` entry names:
    importing runs that module's code, so a config alone cannot make it happen."""
    if name in REWARDS:
        return REWARDS[name](fallback)
    module, colon, attribute = name.partition(":")
    if not colon:
        raise RewardConfigError(f"rewards: unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))} "
                                "(or module:function)")
    if not allow_imports:
        raise RewardConfigError(f"rewards: {name!r} would import code from {module!r}; pass --allow_reward_imports "
                                f"true to allow it, or register the reward (registered: {', '.join(sorted(REWARDS))})")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise RewardConfigError(f"rewards: cannot import {name!r} as module:function ({e})") from None


def reward_functions(names: list[str], weights: list[float] | None, fallback: str,
                     allow_imports: bool = False) -> tuple[list[RewardFunction], list[float]]:
    """(functions, weights) for TRL; `weights` None: 1 each."""
    weights = list(weights) if weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise RewardConfigError(f"reward_weights: {len(weights)} weight(s) {weights} for {len(names)} reward(s) {names}")
    if not names:
        raise RewardConfigError("rewards: name at least one reward, e.g. [accuracy]")
    return [reward_function(name, fallback, allow_imports) for name in names], weights
