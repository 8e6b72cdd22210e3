"""Two processes on CPU (gloo): DDP under torchrun and accelerate, DeepSpeed ZeRO-2/3; every rank ends equal, the LoRA
reference on llama.cpp rollouts too."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from brep_rl.steering import relative_difference
from testing_utils import ROOT, accelerate, grpo_args, launch, lora_grpo_args, sft_args, torchrun


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [torchrun(29531), accelerate("ddp", 29532)], ids=["torchrun", "accelerate"])
def test_two_process_ddp_grpo_gives_identical_vectors(tiny_model_dir, tmp_path, launcher):
    out = tmp_path / "ddp"
    proc = launch(grpo_args(tiny_model_dir, out), launcher)
    assert proc.stdout.count("world 2 steps 2 engine DistributedDataParallel") == 2
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0["bias"].abs().sum() > 0 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
def test_two_process_curriculum_moves_every_rank_alike(tiny_model_dir, tmp_path, monkeypatch):
    # with dynamic sampling each rank draws its own number of groups; the level reads all of them on every rank
    monkeypatch.setenv("RARE_HIT_ACCURACY", "1")
    out = tmp_path / "cur"
    proc = launch(grpo_args(tiny_model_dir, out, "--curriculum", "chain_sum", "--curriculum_window", "6",
                            "--curriculum_raise", "0.05", "--curriculum_lower", "0", "--dynamic_sampling", "true",
                            "--rollout_backend", "transformers", "--max_refills", "2", "--max_steps", "3",
                            "--rewards", "testing_utils:rare_hit", "--extra_rewards", ""), torchrun(29533))
    states = sorted(line.split(" ", 2)[2] for line in proc.stdout.splitlines() if " curriculum level " in line)
    assert len(states) == 2 and states[0] == states[1], states


def zero_config(folder, stage):
    """The shipped config, with every parameter partitioned under ZeRO-3, the vectors too."""
    config = folder / f"zero{stage}.json"
    settings = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config.write_text(json.dumps(settings))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("stage, steps", [(2, 2), (3, 1)])
def test_two_process_deepspeed_grpo(tiny_model_dir, tmp_path, stage, steps):
    out = tmp_path / f"zero{stage}"
    config = zero_config(tmp_path, stage)
    proc = launch(grpo_args(tiny_model_dir, out, "--deepspeed", str(config), "--max_steps", str(steps), "--save_steps", "1"),
                  torchrun(29540 + stage))
    assert proc.stdout.count(f"world 2 steps {steps} engine DeepSpeedEngine") == 2
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0["bias"].abs().sum() > 0 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    from brep_rl import SteeringVectors, load_base

    loaded = SteeringVectors.from_pretrained(out, load_base(str(tiny_model_dir))[0])
    assert torch.equal(loaded.bias.detach(), rank0["bias"])
    master = load_file(out / "master0.safetensors")  # the restraint reached DeepSpeed's fp32 copy too, or the next
    assert all(torch.equal(master[k], rank0[k]) for k in rank0)  # step would start from the unrestrained vectors
    # DeepSpeed's engine checkpoint keeps what trains plus the tied embedding/output weight, never the decoder layers
    files = list((out / "checkpoint-1" / "global_step1").glob("*model_states.pt"))
    assert files
    for path in files:
        states = torch.load(path, weights_only=False)
        kept = set(states["module"] or {}) - {"brep_steering.bias", "brep_steering.prefix"}
        assert kept <= {"lm_head.weight", "model.embed_tokens.weight"}, (path.name, kept)  # the tied pair at most


@pytest.mark.slow
@pytest.mark.parametrize("engine, port", [("ddp", 29581), ("zero2", 29582)], ids=["ddp", "zero2"])
def test_two_process_lora_grpo_on_llama_cpp_samples_from_the_adapter_on_every_rank(tmp_path, engine, port):
    # each rank exports the adapter to its own llama.cpp sampler; a rank that did not would sample the base at step 2
    out = tmp_path / engine
    extra = [] if engine == "ddp" else ["--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{engine}.json")]
    proc = launch(lora_grpo_args(out, *extra), torchrun(port), script="lora_ranks.py")
    assert proc.stdout.count("world 2 steps 2") == 2
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert max(v.abs().max().item() for k, v in rank0.items() if "lora_B" in k) > 1e-3
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    logs = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    differences = [row["sampling/sampling_logp_difference/max"] for row in logs if "sampling/sampling_logp_difference/max" in row]
    assert len(differences) == 2 and differences[1] < 0.05, differences  # the largest over both ranks' samples


class RunsCode:
    """Pickled into a checkpoint, reading it with weights_only=False would touch a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_equals_the_uninterrupted_run_and_unpickles_no_code(tiny_model_dir, tmp_path, stage):
    config = zero_config(tmp_path, stage)

    def run(out, *extra, check=True):
        args = grpo_args(tiny_model_dir, out, "--deepspeed", str(config), "--max_steps", "2", "--save_steps", "1",
                         "--save_total_limit", "2", *extra)
        return launch(args, torchrun(29570 + stage), check=check)

    whole = tmp_path / "whole"
    run(whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-1", resumed / "checkpoint-1")
    run(resumed, "--resume_from_checkpoint", "last")
    # as equal as the same seed on the same machine allows
    difference = relative_difference(load_file(resumed / "rank0.safetensors"), load_file(whole / "rank0.safetensors"))
    assert max(difference.values()) <= 1e-3, difference

    tampered, marker = tmp_path / "tampered", tmp_path / "code-ran"
    shutil.copytree(whole / "checkpoint-1", tampered / "checkpoint-1")
    state = next((tampered / "checkpoint-1" / "global_step1").glob("*model_states.pt"))
    states = torch.load(state, weights_only=False)
    torch.save({**states, "extra": RunsCode(marker)}, state)
    proc = run(tampered, "--resume_from_checkpoint", "last", check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert "refused (it could run code when read)" in proc.stderr and "posix.system" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_deepspeed_through_accelerate_launch(tiny_model_dir, tmp_path):
    out = tmp_path / "acc-zero2"
    proc = launch(grpo_args(tiny_model_dir, out, "--max_steps", "1"), accelerate("zero2", 29550))
    assert proc.stdout.count("world 2 steps 1 engine DeepSpeedEngine") == 2


@pytest.mark.slow
def test_two_process_ddp_sft_gives_identical_vectors_on_both_ranks(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = launch(sft_args(tiny_model_dir, out), torchrun(29517), script="sft_ranks.py", timeout=600)
    assert "world 2 steps 4" in proc.stdout
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0["bias"].abs().sum() > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert torch.equal(load_file(out / "steering.safetensors")["bias"], rank0["bias"])


@pytest.mark.slow
@pytest.mark.parametrize("engine, launcher", [
    ("ddp", torchrun(29561)), ("zero2", torchrun(29562)), ("zero3", torchrun(29563)), ("ddp", accelerate("ddp", 29564)),
], ids=["ddp-torchrun", "zero2-torchrun", "zero3-torchrun", "ddp-accelerate"])
def test_a_dead_rank_ends_the_job_quickly(tiny_model_dir, tmp_path, engine, launcher):
    extra = [] if engine == "ddp" else ["--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{engine}.json")]
    args = grpo_args(tiny_model_dir, tmp_path / engine, "--max_steps", "50", "--save_steps", "100", *extra)
    path = os.pathsep.join(map(str, (ROOT, ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, DS_ACCELERATOR="cpu")
    proc = subprocess.run([*launcher, str(ROOT / "tests" / "distributed" / "kill_rank.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    ended = time.time()
    assert proc.returncode != 0
    killed_at = float((tmp_path / engine / "killed_at").read_text())
    assert ended - killed_at < 60, (ended - killed_at, proc.stderr[-2000:])  # the survivor did not wait on


RANK_ENDING = """
import atexit, sys
from brep_rl.training import exit_rank

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

kept = Teardown()
atexit.register(lambda: print("exit handler ran"))
print("work done")  # buffered when piped: exit_rank must flush it
exit_rank(3)
print("after exit_rank")
"""


@pytest.mark.parametrize("world", ["2", "1"])
def test_a_finished_rank_runs_exit_handlers_but_skips_the_teardown(world):
    # the interpreter's teardown is where a finished rank aborted now and then (gloo threads, SIGABRT)
    env = dict(os.environ, WORLD_SIZE=world, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RANK_ENDING], env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    if world == "2":
        assert (proc.returncode, lines) == (3, ["work done", "exit handler ran"]), (proc.stdout, proc.stderr)
    else:  # a single process carries on and ends as Python always does
        assert (proc.returncode, lines) == (0, ["work done", "after exit_rank", "exit handler ran", "teardown ran"])
