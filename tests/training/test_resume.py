"""Kill anywhere, resume, and end exactly where an uninterrupted run of the same seed ends."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from brep_rl.checkpoints import STAGING, last_checkpoint
from brep_rl.steering import relative_difference
from testing_utils import CHAIN, ROOT, TESTS, grpo_args, sft_args

ARGS = {"grpo": grpo_args, "sft": sft_args}


def run(*command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (ROOT, TESTS))))
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def train(verb, model_dir, out, *extra):
    args = ARGS[verb](model_dir, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", *extra)
    return args


def vectors(out):
    return load_file(out / "steering.safetensors")


def norms_steps(out):
    return [json.loads(line)["step"] for line in (out / "norms.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["grpo", "sft"])
def test_killed_runs_resume_to_the_uninterrupted_result(verb, tiny_model_dir, tmp_path):
    whole = tmp_path / "whole"
    proc = run("-m", "brep_rl.cli", verb, *train(verb, tiny_model_dir, whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = vectors(whole)
    assert expected["bias"].abs().sum() > 0

    for moment, step in (("after_step", 3), ("saving", 4)):
        out = tmp_path / f"{moment}-{step}"
        killed = run(str(TESTS / "training" / "kill_at.py"), moment, str(step), verb, *train(verb, tiny_model_dir, out))
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert last_checkpoint(out).name == "checkpoint-2"  # a checkpoint being written is not taken
        resumed = run("-m", "brep_rl.cli", verb, *train(verb, tiny_model_dir, out, "--resume_from_checkpoint", "last"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        difference = relative_difference(vectors(out), expected)  # as equal as the same seed on one machine allows
        assert max(difference.values()) <= 1e-3, (moment, difference)
        assert norms_steps(out) == norms_steps(whole) == [1, 2, 3, 4]
        assert not (out / STAGING).exists() or not any((out / STAGING).iterdir())


def test_last_skips_a_torn_checkpoint_and_names_it(tmp_path, tiny_llama, caplog):
    from brep_rl import SteeringConfig, SteeringVectors

    steer = SteeringVectors.attach(tiny_llama, SteeringConfig())
    for step in (2, 4, 6):
        steer.save_pretrained(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # cut short by a kill
    (tmp_path / "checkpoint-4" / "steering.safetensors").write_bytes(b"\0" * 10)  # torn
    assert last_checkpoint(tmp_path).name == "checkpoint-2"
    assert "skipping checkpoint" in caplog.text and "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text
    assert torch.is_tensor(steer.bias)


@pytest.mark.parametrize("verb", ["grpo", "sft"])
def test_a_previous_run_is_not_overwritten_silently(verb, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "norms.jsonl").write_text('{"step": 1}\n')
    from brep_rl.cli import main

    assert main([verb, *ARGS[verb](tiny_model_dir, out)]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {out} holds a previous run (norms.jsonl)" in err
    assert "--resume_from_checkpoint last" in err and "--overwrite_output_dir" in err
    assert (out / "norms.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.slow
def test_a_resumed_llama_cpp_run_samples_with_the_resumed_vectors(tmp_path):
    """SmolLM2 with llama.cpp rollouts: the backend holds a copy of the vectors, which a resume must refresh."""
    args = ["--max_steps", "3", "--save_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--max_completion_length", "16", "--eval_limit", "0", "--disable_tqdm", "true", "--temperature", "1.0",
            "--rg_config", CHAIN, "--dynamic_sampling", "true"]  # one-digit sums: every step has groups with a signal
    whole, out = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = run("-m", "brep_rl.cli", "grpo", "--output_dir", str(whole), *args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = run(str(TESTS / "training" / "kill_at.py"), "after_step", "3", "grpo", "--output_dir", str(out), *args)
    assert killed.returncode == -9 and last_checkpoint(out).name == "checkpoint-2"
    resumed = run("-m", "brep_rl.cli", "grpo", "--output_dir", str(out), *args, "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "generating with llama.cpp" in resumed.stderr
    # where the runs part (rewards, refills, verifier timeouts of each step), should they ever do
    assert torch.equal(vectors(out)["bias"], vectors(whole)["bias"]), (
        f"{relative_difference(vectors(out), vectors(whole))}\nuninterrupted:\n{uninterrupted.stderr[-4000:]}\n"
        f"resumed:\n{resumed.stderr[-4000:]}")
