"""Verifiable math rewards: answer extraction, math-verify under a wall-clock timeout, TRL reward functions."""

from reward.extract import extract_answer, has_final_answer_format, last_boxed
from reward.registry import REWARDS, RewardConfigError, register_reward, reward_function, reward_functions
from reward.rewards import (
    accuracy_reward,
    completion_text,
    format_reward,
    guarded,
    intermediate_reward,
    make_accuracy_reward,
    reward_failures,
    stated_results,
    verifier_stats,
)
from reward.verify import Verifier, VerifierError, default_verifier, is_correct

__all__ = [
    "REWARDS", "RewardConfigError", "register_reward", "reward_function", "reward_functions",
    "Verifier", "VerifierError", "accuracy_reward", "completion_text", "default_verifier", "extract_answer",
    "format_reward", "guarded", "has_final_answer_format", "intermediate_reward", "stated_results", "reward_failures", "is_correct", "last_boxed", "make_accuracy_reward", "verifier_stats",
]
