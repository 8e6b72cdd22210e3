"""The curriculum: reasoning-gym levels moved by the rolling training accuracy, and kept across a resume."""

import json

import pytest

from brep_rl import grpo
from brep_rl.curriculum import Curriculum
from brep_rl.data import in_split
from brep_rl.errors import ConfigError
from testing_utils import grpo_args, rare_hit


def test_the_level_rises_above_the_threshold_and_falls_below_it():
    curriculum = Curriculum("chain_sum", window=4, raise_above=0.7, lower_below=0.1, pool=20)
    assert (curriculum.level, curriculum.levels.config(curriculum.level)["max_terms"]) == (0, 2)
    easy = curriculum.problems()
    assert len(easy) == 20 and all(in_split(p.question, "train") for p in easy)
    assert curriculum.record([1.0, 1.0, 0.5]) == 0  # the window is not full yet
    assert curriculum.record([1.0]) == 1 and curriculum.levels.config(curriculum.level)["max_terms"] == 3
    assert max(p.question.count(" + ") + p.question.count(" - ") for p in curriculum.problems()) == 2  # 3 terms now
    assert curriculum.record([0.5, 0.5, 0.5, 0.5]) == 1  # between the thresholds: stay
    assert curriculum.record([0.0, 0.0]) == 1  # the window still holds two 0.5s: mean 0.25
    assert curriculum.record([0.0, 0.0]) == 0
    state = curriculum.state()
    again = Curriculum("chain_sum", window=4, pool=20)
    again.load_state({"level": 1, "window": [1.0]})
    assert again.level == 1 and list(again.window) == [1.0] and state["level"] == 0
    with pytest.raises(ConfigError, match="no curriculum for 'gsm_symbolic'"):
        Curriculum("gsm_symbolic")


def test_gsm8k_tiers_start_with_one_step_problems_and_end_with_all_of_fit():
    curriculum = Curriculum("gsm8k", window=2)
    assert {p.meta["steps"] for p in curriculum.problems()} <= {0, 1}
    curriculum.record([1.0, 1.0])
    assert max(p.meta["steps"] for p in curriculum.problems()) == 2
    curriculum.set_level(9)
    assert curriculum.level == 3 and len(curriculum.problems()) == len(curriculum.levels.all)
    assert all(not p.id.startswith("gsm8k-test") for p in curriculum.problems())


def test_grpo_trains_on_the_curriculum_and_checkpoints_its_state(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "reward_function", lambda name, fallback: rare_hit)
    out = tmp_path / "cur"
    trainer = grpo.main(grpo_args(tiny_model_dir, out, "--curriculum", "chain_sum", "--curriculum_window", "2",
                                  "--curriculum_raise", "0.01", "--curriculum_lower", "0", "--max_steps", "3",
                                  "--save_steps", "2"))
    levels = [h["curriculum/level"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "curriculum/level" in h]
    assert len(levels) == 3 and levels == sorted(levels) and levels[-1] >= 1  # any hit lifts it at this threshold
    saved = json.loads((out / "checkpoint-2" / "brep_state.json").read_text())["curriculum"]
    assert saved["level"] == levels[1]
    assert trainer.curriculum.level == levels[-1]
    resumed = grpo.main(grpo_args(tiny_model_dir, out, "--curriculum", "chain_sum", "--curriculum_window", "2",
                                  "--curriculum_raise", "0.01", "--curriculum_lower", "0", "--max_steps", "3",
                                  "--save_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert resumed.curriculum.level == levels[-1]  # the level at checkpoint-2 came back, then step 3 moved it alike


def even_answers_right(completions=(), answer=(), **kwargs) -> list[float]:
    """Every sample right when the gold answer is even; every other sample when it is odd. Drawn groups average
    ~0.75, the informative (odd) ones 0.5."""
    return [1.0 if int(gold) % 2 == 0 else float(i % 2) for i, gold in enumerate(answer)]


def test_with_dynamic_sampling_the_level_follows_the_groups_as_drawn(tiny_model_dir, tmp_path, monkeypatch):
    # dynamic sampling trains on the odd-answer groups only (0.5); the all-right ones it drops are the policy's
    # accuracy too, and they lift the rolling accuracy over the raise threshold
    monkeypatch.setattr(grpo, "reward_function", lambda name, fallback: even_answers_right)
    out = tmp_path / "dyn"
    trainer = grpo.main(grpo_args(tiny_model_dir, out, "--curriculum", "chain_sum", "--curriculum_window", "4",
                                  "--curriculum_raise", "0.6", "--curriculum_lower", "0", "--dynamic_sampling", "true",
                                  "--rollout_backend", "transformers", "--max_refills", "6", "--max_steps", "4",
                                  "--per_device_train_batch_size", "8",
                                  "--rewards", "testing_utils:rare_hit", "--extra_rewards", ""))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "curriculum/level" in h]
    assert all(log["dynamic/zero_variance_after"] == 0 for log in logs)  # trained: odd-answer groups only
    assert any(log["dynamic/zero_variance_before"] > 0 for log in logs)  # drawn: all-right groups among them
    accuracy = [log["curriculum/accuracy"] for log in logs]  # what the level reads: the drawn groups, logged
    assert min(accuracy) >= 0.5 and max(accuracy) > 0.5
    assert trainer.curriculum.level >= 1
