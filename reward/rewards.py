"""Reward functions with the signature TRL's GRPOTrainer calls: f(prompts, completions, **columns) -> list[float].

The gold answer comes from the dataset column `answer`. Completions may be plain strings or, for
conversational datasets, lists of messages (the last message's content is scored).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from reward.extract import NUMBER, extract_answer, has_final_answer_format
from reward.verify import Verifier, default_verifier


def completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def make_accuracy_reward(fallback: str = "last_number", verifier: Verifier | None = None):
    """1.0 when the extracted final answer equals the gold `answer` under math-verify, else 0.0."""

    def accuracy_reward(prompts=None, completions=(), answer=(), **kwargs) -> list[float]:
        if len(answer) != len(completions):
            raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} gold answers (dataset column 'answer')")
        predictions = [extract_answer(completion_text(c), fallback) for c in completions]
        checker = verifier or default_verifier()
        golds = [None if a is None else str(a) for a in answer]
        return [1.0 if ok else 0.0 for ok in checker.check(golds, predictions)]

    return accuracy_reward


def format_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    """1.0 when the completion states its final answer explicitly (\\boxed{...} or `#### N`)."""
    return [1.0 if has_final_answer_format(completion_text(c)) else 0.0 for c in completions]


# A stated result: "= 24", "= $0.2", "= 1,200", "= 7/2", "#### 72" (the number right after `=` or `####`).
_RESULT_RE = re.compile(rf"(?:=|####)\s*\$?\s*({NUMBER})")


def stated_results(text: str) -> set[float]:
    """The numbers a worked solution states after `=` or `####`, as values (commas dropped, a/b divided, rounded to
    1e-6)."""
    values = set()
    for number in _RESULT_RE.findall(text):
        numerator, _, denominator = number.replace(",", "").partition("/")
        if denominator and float(denominator) == 0:
            continue
        values.add(round(float(numerator) / (float(denominator) if denominator else 1.0), 6))
    return values


def intermediate_reward(prompts=None, completions=(), solution=(), **kwargs) -> list[float | None]:
    """Partial credit for the right quantities: the F1 between the results a completion states (after `=` or `####`)
    and those of the reference `solution` (GSM8K's: one per calculator step, and the final answer). A wrong final answer
    reached through some right steps scores above one with none, so a group whose answers are all wrong still has a
    signal; stating numbers the reference does not reach lowers the score. None (no reward) for a row without a
    solution."""
    if len(solution) != len(completions):
        raise ValueError(f"intermediate_reward: {len(completions)} completions but {len(solution)} solutions "
                         "(dataset column 'solution')")
    scores: list[float | None] = []
    for completion, reference in zip(completions, solution):
        wanted = stated_results(reference) if reference else set()
        if not wanted:
            scores.append(None)
            continue
        stated = stated_results(completion_text(completion))
        hits = len(stated & wanted)
        scores.append(2 * hits / (len(stated) + len(wanted)))
    return scores


accuracy_reward = make_accuracy_reward()

logger = logging.getLogger(__name__)
reward_failures: dict[str, int] = {}


def guarded(func):
    """A reward function that cannot stop training: if it raises, the batch gets None (TRL's "no reward", not 0)
    from it, the failure is logged with its cause, and counted in `reward_failures[name]`."""
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def wrapper(prompts=None, completions=(), **kwargs):
        try:
            return func(prompts=prompts, completions=completions, **kwargs)
        except Exception as e:
            reward_failures[name] = reward_failures.get(name, 0) + 1
            logger.error("reward function %s failed on a batch of %d (%s: %s); those completions get no reward from it",
                         name, len(completions), type(e).__name__, e)
            return [None] * len(completions)

    return wrapper


def verifier_stats() -> dict[str, float]:
    """Counters of the process-wide verifier (checks, correct, timeouts, errors) for trainers to log."""
    return default_verifier().counts()
