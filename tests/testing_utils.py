"""What the tests share: the tiny random model factory, prompts, the flags of short training runs, launchers.

Markers (pyproject.toml): `slow` marks tests on the real SmolLM2-135M model or with several processes; the whole
suite runs them, `make test-fast` leaves them out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from brep_rl.model import freeze

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def make_tiny(arch: str, vocab_size: int, pad_token_id: int, seed: int = 0, hidden: int = 64, layers: int = 3):
    """A tiny random model whose greedy outputs vary with the input (initializer_range large enough)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.name_or_path = f"tiny-{arch}"
    freeze(model)
    return model


PROMPTS = [
    "What is 12 + 30?",
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "Compute 7 times 8.",
]


def text_length(prompts=None, completions=(), **kwargs) -> list[float]:
    """A reward with real variance on a random tiny model's output, so GRPO tests have a gradient to follow."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) / 50 for t in texts]


def rare_hit(prompts=None, completions=(), **kwargs) -> list[float]:
    """A binary reward a random model earns now and then (its text's length is a multiple of 5): many groups of
    its completions score all 0, some vary."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 5 == 0) for t in texts]


CHAIN = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'


def edit_records(run: Path, edit) -> None:
    """Rewrite an eval run's samples.jsonl with `edit(record)` applied to every record (e.g. to mark answers right)."""
    path = run / "samples.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        edit(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def grpo_args(model_dir, out, *extra):
    return [
        "--model", str(model_dir), "--task", "rg:chain_sum", "--rg_config", CHAIN, "--limit", "40",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "6",
        "--max_steps", "2", "--save_steps", "1", "--learning_rate", "0.05", "--mode", "bias+prefix", "--radius", "0.05",
        "--eval_limit", "0", "--output_dir", str(out), "--disable_tqdm", "true", "--temperature", "1.0",
        "--extra_rewards", "testing_utils:text_length", "--allow_reward_imports", "true", *extra,
    ]


def sft_args(model_dir, out, *extra):
    return [
        "--model", str(model_dir), "--task", "gsm8k", "--limit", "24", "--heldout", "4", "--max_length", "160",
        "--truncate_tokens", "16", "--mode", "bias+prefix", "--radius", "0.05", "--learning_rate", "0.05",
        "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
        "--eval_limit", "0", "--output_dir", str(out), "--disable_tqdm", "true", *extra,
    ]


def lora_grpo_args(out, *extra) -> list[str]:
    """A short LoRA GRPO run on SmolLM2 with llama.cpp rollouts; the learning rate is large so that one step moves
    the adapter far enough for a stale sampler to show."""
    return ["--model", "smollm2-135m", "--rollout_backend", "llama.cpp", "--task", "rg:chain_sum", "--rg_config", CHAIN,
            "--limit", "40", "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
            "--max_steps", "2", "--save_steps", "1", "--learning_rate", "0.01", "--lr_scheduler_type", "constant",
            "--lora_r", "4", "--eval_limit", "0", "--temperature", "1.0", "--logging_steps", "1", "--disable_tqdm", "true",
            "--output_dir", str(out), "--extra_rewards", "testing_utils:text_length", "--allow_reward_imports", "true", *extra]


def launch(args, launcher, script="grpo_ranks.py", timeout=900, check=True):
    """Run tests/distributed/<script> under `launcher` (torchrun or accelerate launch) from the repository root."""
    path = os.pathsep.join(map(str, (ROOT, TESTS)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, DS_ACCELERATOR="cpu")
    cmd = [*launcher, str(TESTS / "distributed" / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0 or not check, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def torchrun(port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def accelerate(config, port):
    """The documented accelerate forms (on CPU, `--cpu --num_processes 2` would start one process)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml",
            "--main_process_port", str(port)]


def recorded_rollouts(monkeypatch) -> list[dict]:
    """Every output of the trainer's rollout function (what TRL trains on), in order, once training has run."""
    from brep_rl import grpo

    outputs = []
    real_rollout = grpo.SteeringGRPOTrainer._rollout

    def recording_rollout(self, prompts, trainer):
        outputs.append(real_rollout(self, prompts, trainer))
        return outputs[-1]

    monkeypatch.setattr(grpo.SteeringGRPOTrainer, "_rollout", recording_rollout)
    return outputs
