"""A check for a machine with a CUDA GPU (CI has none): every training and evaluation path on the GPU, briefly.

For fp32 and bf16 bases: SFT of bias+prefix vectors with validation, GRPO from them with transformers rollouts
(dynamic sampling, hints for unsolved groups, the GSM8K step-tier curriculum), a GRPO run resumed from its middle
checkpoint against the uninterrupted run, the artifact reloaded onto the GPU and its steered logits against the same
on the CPU, and the eval harness on the GPU. Exits non-zero at the first failure; prints one line per check.

    python scripts/cuda_check.py --model HF_FOLDER --output runs/cuda_check

`--device cpu` runs the same checks on the CPU (the test suite does, so that this script keeps working).

Any small HF base will do (a tiny random llama with a real tokenizer is enough); the problems are GSM8K train from
$BREP_RL_DATA (or ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from brep_rl import SteeringVectors, load_base
from brep_rl.cli import main as brep_rl
from brep_rl.steering import WEIGHTS_NAME, relative_difference

STEPS = 4
GSM8K = ["--task", "gsm8k", "--limit", "24", "--mode", "bias+prefix", "--radius", "0.05",
         "--learning_rate", "0.05", "--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "3",
         "--logging_steps", "1", "--eval_limit", "0", "--disable_tqdm", "true", "--report_to", "none"]
VALIDATION = ["--validation_steps", "2", "--validation_split", "train", "--validation_offset", "24",
              "--validation_limit", "4"]


def verb(device: str, *argv: str) -> None:
    """One brep-rl command in this process; fails unless it succeeds (and, on a GPU, allocated memory there)."""
    gpu = device != "cpu"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = brep_rl([*argv, "--use_cpu", "true"] if not gpu and argv[0] != "eval" else list(argv))
    if code != 0:
        sys.exit(f"FAIL brep-rl {' '.join(argv)}: exit {code}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0
    if gpu and peak == 0:
        sys.exit(f"FAIL brep-rl {' '.join(argv)} never used the GPU")
    print(f"ok   brep-rl {argv[0]:<5} {time.perf_counter() - start:5.1f} s, GPU peak {peak:7.1f} MiB")


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"FAIL {message}")
    print(f"ok   {message}")


def check_dtype(model: str, out: Path, dtype: str, device: str) -> None:
    print(f"-- base in {dtype}")
    common = ["--model", model, "--dtype", dtype, "--per_device_train_batch_size", "4"]
    sft = out / f"sft-{dtype}"
    verb(device, "sft", *common, *GSM8K, *VALIDATION, "--heldout", "4", "--max_length", "160", "--truncate_tokens", "16",
         "--output_dir", str(sft))
    check((sft / "best" / WEIGHTS_NAME).is_file(), f"SFT kept its best validated vectors ({sft}/best)")

    grpo = [*common, *GSM8K, "--init_from", str(sft), "--rollout_backend", "transformers", "--num_generations", "4",
            "--max_completion_length", "12", "--temperature", "1.0", "--dynamic_sampling", "true", "--max_refills", "1",
            "--hint_share", "0.5", "--curriculum", "gsm8k", "--curriculum_window", "4",
            "--extra_rewards", "testing_utils:text_length", "--allow_reward_imports", "true"]
    whole, resumed = out / f"grpo-{dtype}", out / f"grpo-{dtype}-resumed"
    verb(device, "grpo", *grpo, "--output_dir", str(whole))
    first = json.loads((whole / "trainer_state.json").read_text())["log_history"][0]
    check(first.get("dynamic/refills", 0) >= 1 and first.get("hints/groups", 0) >= 1 and "curriculum/level" in first,
          f"GRPO refilled unsolved groups, hinted them and kept a curriculum level (sampler/trainer KL "
          f"{first['rollout/kl_sampler_trainer']:.1e})")
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / f"checkpoint-{STEPS}")
    verb(device, "grpo", *grpo, "--output_dir", str(resumed), "--resume_from_checkpoint", "last")
    uninterrupted = load_file(whole / WEIGHTS_NAME)
    difference = max(relative_difference(load_file(resumed / WEIGHTS_NAME), uninterrupted).values())
    moved = uninterrupted["bias"].abs().sum() > 0
    check(moved and difference <= 1e-2, f"GRPO resumed from step 2 ends where the whole run ends (max relative "
          f"difference per vector {difference:.1e})")

    on_device, tokenizer = load_base(model, dtype=dtype, device=device)
    reference, _ = load_base(model, dtype="float32")
    ids = tokenizer(["What is 12 + 30?", "Compute 7 times 8."], return_tensors="pt", padding=True)
    steered, unsteered = [], []
    for base in (on_device, reference):
        steer = SteeringVectors.from_pretrained(whole, base)
        with torch.no_grad(), steer.window(ids.input_ids.shape[1]):
            steered.append(base(**ids.to(base.device)).logits.float().cpu())
        with torch.no_grad(), steer.disabled():
            unsteered.append(base(**ids.to(base.device)).logits.float().cpu())
        check(not torch.equal(steered[-1], unsteered[-1]), f"the reloaded vectors change the {base.dtype} logits on "
              f"the {base.device}")
    # The steered model on the device may differ from fp32 on the CPU by what the base itself differs (bf16 rounding).
    gap, base_gap = (float((pair[0] - pair[1]).abs().max() / pair[1].abs().max()) for pair in (steered, unsteered))
    check(gap <= 2 * base_gap + 1e-5, f"steered {dtype} logits on the {device} match fp32 on the CPU as closely as the "
          f"base's do (max gap {gap:.1e} of the largest logit; base {base_gap:.1e})")

    evaluation = out / f"eval-{dtype}"
    verb(device, "eval", "--model", model, "--dtype", dtype, "--task", "gsm8k", "--split", "test", "--limit", "8",
         "--max_new_tokens", "24", "--backend", "transformers", "--device", device, "--steering", str(whole),
         "--output", str(evaluation))
    summary = json.loads((evaluation / "summary.json").read_text())
    check(len(summary["models"]) == 2, f"the eval harness scored the base and the steered model on the {device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a small HF base (folder or hub id)")
    parser.add_argument("--output", default="runs/cuda_check", help="a folder for the runs (replaced)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a machine with a GPU (or give --device cpu)")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if args.device != 'cpu' else 'the CPU'}")
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    for dtype in ("float32", "bfloat16"):
        check_dtype(args.model, out, dtype, args.device)
    print(f"all checks passed on the {args.device}")


if __name__ == "__main__":
    main()
