"""Validation during training: greedy accuracy every N steps, a log per step, the best vectors kept."""

import json

import pytest

from brep_rl import SteeringVectors, load_base
from brep_rl.cli import main
from brep_rl.grpo import main as grpo_main
from brep_rl.sft import main as sft_main
from testing_utils import grpo_args, sft_args


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
