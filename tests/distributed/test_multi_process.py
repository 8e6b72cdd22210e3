"""Two processes on CPU (gloo): DDP under torchrun and accelerate, DeepSpeed ZeRO-2/3; every rank ends equal."""

import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from testing_utils import ROOT, accelerate, grpo_args, launch, sft_args, torchrun


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [torchrun(29531), accelerate("ddp", 29532)], ids=["torchrun", "accelerate"])
def test_two_process_ddp_grpo_gives_identical_vectors(tiny_model_dir, tmp_path, launcher):
    out = tmp_path / "ddp"
    proc = launch(grpo_args(tiny_model_dir, out), launcher)
    assert proc.stdout.count("world 2 steps 2 engine DistributedDataParallel") == 2
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0["bias"].abs().sum() > 0 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
@pytest.mark.parametrize("stage, steps", [(2, 2), (3, 1)])
def test_two_process_deepspeed_grpo(tiny_model_dir, tmp_path, stage, steps):
    out = tmp_path / f"zero{stage}"
    config = tmp_path / f"zero{stage}.json"  # the shipped config, with every parameter partitioned under ZeRO-3,
    settings = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())  # the vectors too
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config.write_text(json.dumps(settings))
    proc = launch(grpo_args(tiny_model_dir, out, "--deepspeed", str(config), "--max_steps", str(steps), "--save_steps", "1"),
                  torchrun(29540 + stage))
    assert proc.stdout.count(f"world 2 steps {steps} engine DeepSpeedEngine") == 2
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0["bias"].abs().sum() > 0 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    from brep_rl import SteeringVectors, load_base

    loaded = SteeringVectors.from_pretrained(out, load_base(str(tiny_model_dir))[0])
    assert torch.equal(loaded.bias.detach(), rank0["bias"])
    # DeepSpeed's engine checkpoint keeps what trains plus the tied embedding/output weight, never the decoder layers
    files = list((out / "checkpoint-1" / "global_step1").glob("*model_states.pt"))
    assert files
    for path in files:
        states = torch.load(path, weights_only=False)
        kept = set(states["module"] or {}) - {"brep_steering.bias", "brep_steering.prefix"}
        assert kept <= {"lm_head.weight", "model.embed_tokens.weight"}, (path.name, kept)  # the tied pair at most


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
