"""What a person sees while training, and what goes to a tracker."""

import pytest

from brep_rl.grpo import main as grpo_main
from brep_rl.progress import headline
from testing_utils import grpo_args


def test_headline_keeps_the_figures_that_matter():
    logs = {"loss": 0.01234, "reward": 0.5, "rewards/accuracy_reward/mean": 0.25, "frac_reward_zero_std": 0.375,
            "step_time": 8.04, "clip_ratio/low_mean": 0.0, "completions/mean_length": 12.0}
    assert headline(logs) == {"loss": "0.0123", "reward": "0.500", "accuracy": "25%", "no signal": "38%", "s/step": "8.0"}


def test_a_run_prints_short_lines_and_reports_every_metric_to_tensorboard(tiny_model_dir, tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    grpo_main(grpo_args(tiny_model_dir, out, "--report_to", "tensorboard"))
    printed = capsys.readouterr().out
    assert "step 2/2  loss" in printed and "no signal" in printed
    assert "'clip_ratio/low_mean'" not in printed  # no raw dict of every metric
    events = list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard's folder inside output_dir
    assert events
    accumulator = event_accumulator.EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/reward", "train/frac_reward_zero_std", "train/bias_norm_mean"} <= tags, sorted(tags)
    assert [e.step for e in accumulator.Scalars("train/reward")] == [1, 2]
