"""The reward registry: rewards by name, with TRL's signature, and clear errors for names that do not exist."""

import pytest

from reward import REWARDS, RewardConfigError, register_reward, reward_function, reward_functions


def test_registered_rewards_score_completions():
    assert {"accuracy", "format", "intermediate"} <= set(REWARDS)
    funcs, weights = reward_functions(["accuracy", "format", "intermediate"], [1.0, 0.25, 0.5], fallback="last_number")
    completions = ["so 2 + 2 = 4\n#### 4", "it is 5"]
    assert funcs[0](prompts=None, completions=completions, answer=["4", "4"]) == [1.0, 0.0]
    assert funcs[1](prompts=None, completions=completions) == [1.0, 0.0]
    assert funcs[2](prompts=None, completions=completions, solution=["2 + 2 = 4\n#### 4"] * 2) == [1.0, 0.0]
    assert weights == [1.0, 0.25, 0.5]


def test_a_new_reward_registers_by_name(monkeypatch):
    monkeypatch.setitem(REWARDS, "_test_short", REWARDS.get("_test_short"))

    @register_reward("_test_short")
    def short(fallback):
        return lambda prompts=None, completions=(), **kw: [float(len(c) < 5) for c in completions]

    assert reward_function("_test_short")(completions=["abc", "abcdef"]) == [1.0, 0.0]


def test_module_function_entries_import_only_when_allowed():
    assert reward_function("testing_utils:text_length", allow_imports=True)(completions=["x" * 50]) == [1.0]
    with pytest.raises(RewardConfigError, match=r"'testing_utils:text_length' would import code .*--allow_reward_imports"):
        reward_function("testing_utils:text_length")


@pytest.mark.parametrize("names, weights, message", [
    (["acuracy"], None, r"unknown reward 'acuracy'; registered: accuracy, format"),
    (["accuracy"], [1.0, 2.0], r"reward_weights: 2 weight\(s\) \[1.0, 2.0\] for 1 reward\(s\)"),
    ([], None, r"name at least one reward"),
    (["testing_utils:nope"], None, r"cannot import 'testing_utils:nope'"),
])
def test_bad_reward_configs_name_the_problem(names, weights, message):
    with pytest.raises(RewardConfigError, match=message):
        reward_functions(names, weights, fallback="none", allow_imports=True)
