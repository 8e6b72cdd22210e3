"""Dynamic sampling: batches of groups with a signal, refilled from fresh prompts, capped, never smaller."""

import json
import math
import re

import pytest
import torch

from brep_rl import grpo
from brep_rl.data import scratchpad_solution
from brep_rl.dynamic_sampling import ScoredGroup, informative_groups
from testing_utils import grpo_args, rare_hit, recorded_rollouts


def group(name: str, accuracies: list[float]) -> ScoredGroup:
    return ScoredGroup(rows=[{"id": name}] * len(accuracies), rollout=name, accuracies=accuracies)


def test_groups_without_signal_are_replaced_by_fresh_informative_ones():
    first = [group("a", [1, 0]), group("b", [0, 0]), group("c", [1, 1]), group("d", [0, 1])]
    draws = []

    def draw(count, round_):
        draws.append((count, round_))
        return [group(f"r{round_}-{i}", [0, 0] if i == 0 and round_ == 1 else [1, 0]) for i in range(count)]

    batch, stats = informative_groups(first, draw, max_refills=4)
    assert [g.rollout for g in batch] == ["a", "d", "r1-1", "r2-0"]
    assert draws == [(2, 1), (1, 2)]
    assert stats.zero_variance_before == 0.5 and stats.zero_variance_after == 0.0
    assert stats.as_metrics(4)["dynamic/extra_generation"] == (4 + 2 + 1) / 4 - 1


def test_the_refill_cap_tops_the_batch_up_with_dropped_groups():
    first = [group("a", [1, 0]), group("b", [0, 0]), group("c", [1, 1])]
    batch, stats = informative_groups(first, lambda count, round_: [group("x", [0, 0])] * count, max_refills=2)
    assert [g.rollout for g in batch] == ["a", "b", "c"] and stats.refills == 2
    assert stats.zero_variance_after == 2 / 3
    batch, stats = informative_groups(first, lambda count, round_: [], max_refills=0)
    assert len(batch) == 3 and stats.generated_groups == 3


# 4 problems, 4 groups a step: refills draw problems the batch already holds, at times side by side
@pytest.mark.parametrize("problems,batch", [(40, 8), (4, 16)])
def test_grpo_with_dynamic_sampling_trains_on_the_groups_it_scored(tiny_model_dir, tmp_path, monkeypatch, problems, batch):
    # the filter and TRL's reward read the same binary reward, which varies on a random model
    monkeypatch.setattr(grpo, "reward_function", lambda name, fallback: rare_hit)
    scored, real_filter = [], grpo.informative_groups

    def recording_filter(*args):
        batch, stats = real_filter(*args)
        scored.append([c for g in batch for c in g.rollout[1][1]])  # the completions of the groups kept, in order
        return batch, stats

    monkeypatch.setattr(grpo, "informative_groups", recording_filter)
    rollouts = recorded_rollouts(monkeypatch)
    out = tmp_path / "dyn"
    trainer = grpo.main(grpo_args(tiny_model_dir, out, "--dynamic_sampling", "true", "--rollout_backend", "transformers",
                                  "--max_refills", "3", "--rewards", "testing_utils:rare_hit", "--extra_rewards", "",
                                  "--max_steps", "4", "--per_device_train_batch_size", str(batch), "--limit", str(problems)))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    assert len(logs) == 4
    for log in logs:
        assert 0 <= log["dynamic/zero_variance_after"] <= log["dynamic/zero_variance_before"] <= 1
        assert log["dynamic/extra_generation"] == 0 or log["dynamic/refills"] >= 1
        # TRL trained on the very rollouts the filter scored: the same groups are without signal
        assert log["frac_reward_zero_std"] == log["dynamic/zero_variance_after"]
    assert any(log["dynamic/zero_variance_before"] > 0 for log in logs)  # there was something to filter
    # TRL trained on exactly the completions scored, group by group
    assert [r["completion_ids"] for r in rollouts] == scored and len(scored) == 4
    assert not trainer._stash  # every stashed rollout was used


def test_hint_ids_are_the_start_of_the_worked_solution_never_its_answer(tokenizer):
    solution = "She sold 48 / 2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\n#### 72"
    body = tokenizer("She sold 48 / 2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.",
                     add_special_tokens=False).input_ids
    assert grpo.hint_ids(tokenizer, solution, 0.5) == body[: len(body) // 2]
    assert grpo.hint_ids(tokenizer, solution, 1.0) == body and grpo.hint_ids(tokenizer, solution, 0.0) == []


def test_unsolved_groups_are_generated_again_and_trained_with_a_hint(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "reward_function", lambda name, fallback: rare_hit)
    hints, real_hint_ids = [], grpo.hint_ids

    def recording_hint_ids(tokenizer, solution, share):
        hints.append(real_hint_ids(tokenizer, solution, share))
        return hints[-1]

    monkeypatch.setattr(grpo, "hint_ids", recording_hint_ids)
    rollouts = recorded_rollouts(monkeypatch)
    out = tmp_path / "hints"
    grpo.main(grpo_args(tiny_model_dir, out, "--task", "gsm8k", "--dynamic_sampling", "true", "--max_refills", "1",
                        "--hint_share", "0.8", "--rollout_backend", "transformers", "--rewards", "testing_utils:rare_hit",
                        "--extra_rewards", "", "--max_steps", "4", "--per_device_train_batch_size", "16"))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    # the share falls linearly to 0 at max_steps (4): 0.8 at step 0, then 0.6, 0.4, 0.2
    assert [log["hints/share"] for log in logs] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert sum(log["hints/groups"] for log in logs) == len(hints) > 0
    assert all(0 <= log["hints/informative"] <= log["hints/groups"] for log in logs)
    # TRL trained on hinted prompts: prompt ids that end in a hint that was handed out
    assert any(len(h) and ids[-len(h):] == h for r in rollouts for ids in r["prompt_ids"] for h in hints)


def solution_logprob(trainer, rows) -> float:
    """Mean log-prob per token of each row's reference solution (and end of turn) after its prompt."""
    total, count = 0.0, 0
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    for prompt, row in zip(prompt_ids, rows):
        answer = grpo.demonstration_ids(trainer.processing_class, row["solution"])
        ids = torch.tensor([prompt + answer])
        with torch.no_grad(), trainer.steer.window(len(prompt)):
            logprobs = trainer.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        total += logprobs.gather(1, torch.tensor(answer)[:, None]).sum().item()
        count += len(answer)
    return total / count


def test_every_group_can_carry_a_demonstration(tiny_model_dir, tmp_path, monkeypatch):
    def accuracy(completions, answer, **kwargs):  # the reference solutions, and a random text now and then
        return [float("####" in text or rare_hit(completions=[text])[0]) for text in completions]

    monkeypatch.setattr(grpo, "reward_function", lambda name, fallback: accuracy)
    rollouts = recorded_rollouts(monkeypatch)
    out = tmp_path / "every"
    trainer = grpo.main(grpo_args(tiny_model_dir, out, "--dynamic_sampling", "true", "--demonstrations", "true",
                                  "--demonstration_groups", "every", "--max_refills", "0", "--rollout_backend",
                                  "transformers", "--extra_rewards", "", "--max_completion_length", "48",
                                  "--max_steps", "3", "--per_device_train_batch_size", "8"))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    tokenizer = trainer.processing_class
    trained = [ids for r in rollouts for ids in r["completion_ids"]]
    solutions = {tuple(grpo.demonstration_ids(tokenizer, row["solution"])) for row in trainer.train_dataset}
    # the last of every group of 4 is its demonstration, solved by the policy or not
    assert all(tuple(ids) in solutions for ids in trained[3::4])
    assert sum(log["demonstrations/groups"] for log in logs) == len(trained) // 4 == 6
    own = [accuracy([tokenizer.decode(ids, skip_special_tokens=True)], None)[0] for i, ids in enumerate(trained) if i % 4 != 3]
    assert any(own)  # some groups had a right sample of their own: --demonstration_groups unsolved would skip them


@pytest.mark.parametrize("kind", ["reference", "stepwise"])
def test_unsolved_groups_train_on_the_reference_solution_in_place_of_a_sample(tiny_model_dir, tmp_path, monkeypatch, kind):
    rollouts = recorded_rollouts(monkeypatch)
    out = tmp_path / "demonstrations"
    # the accuracy reward alone: a random model solves no sum, so every group is all wrong and has no signal
    trainer = grpo.main(grpo_args(tiny_model_dir, out, "--dynamic_sampling", "true", "--demonstrations", "true",
                                  "--max_refills", "0", "--rollout_backend", "transformers", "--extra_rewards", "",
                                  "--max_completion_length", "48", "--max_steps", "3", "--per_device_train_batch_size", "8",
                                  "--radius", "1.0", "--solutions", kind))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    trained = [row for r in rollouts for row in zip(r["completion_ids"], r["logprobs"])]  # (ids, sampler log-probs)
    tokenizer, rows = trainer.processing_class, list(trainer.train_dataset)
    # the demonstrations are the solutions asked for: the task's own "a - b = c", or the place-value scratchpad
    expressions = [re.search(r"(-?\d+(?: [+-] \d+)+) =", row["prompt"][-1]["content"]).group(1) for row in rows]
    want = [scratchpad_solution(e, stepwise=True) if kind == "stepwise" else f"{e} = {row['answer']}\n#### {row['answer']}"
            for e, row in zip(expressions, rows)]
    assert [row["solution"] for row in rows] == want
    solutions = {tuple(grpo.demonstration_ids(tokenizer, row["solution"])) for row in rows}
    demonstrations = [logprobs for ids, logprobs in trained if tuple(ids) in solutions]
    # one demonstration per group, in the last place, never sampled: NaN sampler log-probs (importance ratio 1)
    assert len(demonstrations) == sum(log["demonstrations/groups"] for log in logs) == len(trained) // 4 == 6
    assert all(tuple(ids) in solutions for ids, _ in trained[3::4])
    assert all(math.isnan(lp) for logprobs in demonstrations for lp in logprobs)
    assert all(log["dynamic/zero_variance_after"] == 0 and log["reward"] == pytest.approx(0.25) for log in logs)
    assert all(math.isfinite(log["rollout/kl_sampler_trainer"]) for log in logs)  # sampled tokens only
    # trained toward the answers it never sampled
    steered = solution_logprob(trainer, rows[:8])
    with trainer.steer.disabled():
        assert steered > solution_logprob(trainer, rows[:8]) + 0.1, steered
