"""Validation during training: greedy accuracy (and pass@k) every N steps, a log per step, the best vectors kept."""

import json
from types import SimpleNamespace

import pytest

from brep_rl import SteeringConfig, SteeringVectors, load_base
from brep_rl.arguments import ValidationArguments
from brep_rl.cli import main
from brep_rl.data import Problem
from brep_rl.grpo import main as grpo_main
from brep_rl.rollout import Rollouts
from brep_rl.sft import main as sft_main
from brep_rl.steering import read_artifact
from brep_rl.validation import ValidationCallback
from testing_utils import ROOT, grpo_args, sft_args


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_validation_every_n_steps_logs_accuracy_and_keeps_the_best(stage, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / stage
    run, args = (grpo_main, grpo_args) if stage == "grpo" else (sft_main, sft_args)
    run(args(tiny_model_dir, out, "--validation_steps", "1", "--validation_limit", "6", "--max_steps", "2"))
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["n"] == 6 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["seconds"] <= rows[1]["seconds"] <= rows[2]["seconds"]  # step 0: where training starts
    assert "validation at step 1:" in capsys.readouterr().out
    best = SteeringVectors.from_pretrained(out / "best", load_base(str(tiny_model_dir))[0])
    assert best.config.provenance["validation_accuracy"] == max(r["accuracy"] for r in rows)


def test_validation_on_the_test_split_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--validation_steps", "5", "--validation_split", "test"])
    assert "--validation_split: choosing checkpoints on the test split biases the test" in capsys.readouterr().err


class ScriptedBackend:
    """Answers by a script: greedy answers first, then (problem-major) the sampled ones."""

    def __init__(self, tokenizer, greedy, sampled):
        self.tokenizer, self.script = tokenizer, {0.0: greedy, 1.0: sampled}

    def sync(self, steer):
        pass

    def generate(self, prompt_ids, n, sampling, seeds=None, tool=None):
        texts = self.script[sampling.temperature]
        assert len(texts) == len(prompt_ids) * n
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return Rollouts([p for p in prompt_ids for _ in range(n)], ids, None, 0.0)


@pytest.mark.parametrize("pick", ["accuracy", "pass@k"])
def test_validation_logs_format_and_pass_at_k_and_keeps_the_best_by_the_metric_picked(pick, tiny_llama, tokenizer, tmp_path):
    problems = [Problem("a", "1 + 0 = ?", "1"), Problem("b", "1 + 1 = ?", "2")]
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias"))
    trainer = SimpleNamespace(steer=steer, model=tiny_llama, processing_class=tokenizer, provenance=dict,
                              args=SimpleNamespace(output_dir=str(tmp_path), seed=0))
    args = ValidationArguments(validation_steps=1, validation_samples=3, validation_temperature=1.0,
                               validation_pick=pick)
    steps = [  # step 1: greedy right on both, one sample right; step 2: greedy right on one (the other unformatted),
        # some sample right on both
        ScriptedBackend(tokenizer, ["#### 1", "#### 2"], ["#### 1", "#### 0", "#### 0", "#### 0", "#### 0", "#### 0"]),
        ScriptedBackend(tokenizer, ["#### 1", "so 0"], ["#### 0", "#### 1", "#### 0", "#### 2", "#### 2", "#### 0"]),
    ]
    callback = ValidationCallback(trainer, problems, args, None, None, "last_number", steps[0])
    for step, backend in enumerate(steps, 1):
        callback.backend = backend
        callback.validate(trainer.args, SimpleNamespace(global_step=step))
    rows = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [(r["accuracy"], r["format"], r["pass@k"], round(r["sample_accuracy"], 3), r["k"]) for r in rows] == [
        (1.0, 1.0, 0.5, 0.167, 3), (0.5, 0.5, 1.0, 0.5, 3)]
    config, _ = read_artifact(tmp_path / "best")
    assert config.provenance["validation_pass@k"] == (0.5 if pick == "accuracy" else 1.0)


@pytest.mark.parametrize("given, trained, expected", [(None, {"max_completion_length": 48}, 48), (None, {}, 32),
                                                     (20, {"max_completion_length": 48}, 20)])
def test_validation_answers_are_as_long_as_the_trained_ones_unless_set(given, trained, expected, tokenizer, tmp_path):
    trainer = SimpleNamespace(processing_class=tokenizer, args=SimpleNamespace(output_dir=str(tmp_path), seed=0, **trained))
    args = ValidationArguments(validation_steps=1, validation_max_new_tokens=given, validation_samples=2)
    callback = ValidationCallback(trainer, [Problem("a", "1 + 0 = ?", "1")], args, None, None, "last_number")
    assert callback.sampling.max_new_tokens == callback.sampled.max_new_tokens == expected


@pytest.mark.parametrize("argv, message", [
    (["--validation_pick", "pass@k"], "--validation_pick pass@k needs --validation_samples"),
    (["--validation_samples", "4", "--validation_temperature", "0"], "--validation_temperature: sampling 4 answers"),
])
def test_pass_at_k_settings_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--validation_steps", "5", *argv])
    assert message in capsys.readouterr().err


def test_a_second_stage_is_drawn_after_the_first(tmp_path, monkeypatch, capsys):
    from brep_rl.plots import validation_curve
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from plot_run import main as plot_main

    run = tmp_path / "sft_grpo"
    run.mkdir()
    rows = [{"step": 0, "accuracy": 0.4, "seconds": 3.0}, {"step": 10, "accuracy": 0.5, "seconds": 123.0}]
    (run / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, minutes, accuracy = validation_curve(run)
    assert steps == [0, 10] and minutes == pytest.approx([0.05, 2.05]) and accuracy == [40.0, 50.0]
    steps, minutes, _ = validation_curve(run, (48, 597.0))  # after a 48-step, 597-second first stage
    assert steps == [48, 58] and minutes == pytest.approx([10.0, 12.0])

    out = tmp_path / "v.png"
    assert plot_main(["--validation", f"sft+grpo={run}", "--after", "sft+grpo=48,597", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    for after, message in [("sft+grpo=48", "expected LABEL=STEPS,SECONDS"), ("sft=48,597", "not among the --validation")]:
        with pytest.raises(SystemExit):
            plot_main(["--validation", f"sft+grpo={run}", "--after", after, "--out", str(out)])
        assert message in capsys.readouterr().err
