"""Rollout backends side by side: llama.cpp vs transformers, in one run on the same machine.

1. GRPO step time with the demo's settings (scripts/grpo.py defaults: SmolLM2-135M, bias on layers 1-29,
   16 completions of 32 tokens per step), split into generation and the rest (rewards, loss, update).
   Target: llama.cpp step time <= 0.3x transformers.
2. Eval harness throughput: greedy generation on GSM8K test problems, tokens/s.
The first step of each run is a warm-up and left out; medians over the rest. Run alone:
    python benchmarks/rollout_backends.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import write
from transformers import TrainerCallback

from brep_rl import load_base
from brep_rl.arguments import EvalSettings
from brep_rl.evaluate import evaluate
from brep_rl.grpo import SteeringGRPOTrainer
from brep_rl.grpo import main as grpo_main
from brep_rl.rollout import make_backend

BACKENDS = ("transformers", "llama.cpp")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._start)


def grpo_run(backend: str, steps: int, threads: int, output: str) -> dict:
    """Steps of the demo's GRPO run; generation timed around TRL's _generate (both backends pass through it)."""
    generation: list[tuple[float, int]] = []
    original = SteeringGRPOTrainer._generate

    def timed(self, prompts):
        start = time.perf_counter()
        out = original(self, prompts)
        generation.append((time.perf_counter() - start, sum(len(ids) for ids in out[1])))
        return out

    timer = StepTimer()
    original_init = SteeringGRPOTrainer.__init__

    def init_with_timer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(timer)

    SteeringGRPOTrainer._generate, SteeringGRPOTrainer.__init__ = timed, init_with_timer
    try:
        grpo_main(["--rollout_backend", backend, "--max_steps", str(steps), "--eval_limit", "0", "--save_steps", "1000",
                   "--output_dir", output, "--threads", str(threads), "--disable_tqdm", "true", "--report_to", "none"])
    finally:
        SteeringGRPOTrainer._generate, SteeringGRPOTrainer.__init__ = original, original_init
    step = statistics.median(timer.steps[1:])
    gen_seconds = statistics.median(s for s, _ in generation[1:])
    tokens = sum(n for _, n in generation[1:]) / sum(s for s, _ in generation[1:])
    return {"step s": step, "generation s": gen_seconds, "rest s": step - gen_seconds, "generated tokens/s": tokens}


def eval_run(backend_name: str, problems: int, tokens: int) -> float:
    model, tokenizer = load_base("smollm2-135m")
    backend = make_backend(backend_name, model, tokenizer, "smollm2-135m", [], torch.get_num_threads())
    settings = EvalSettings(task="gsm8k", limit=problems, max_new_tokens=tokens, backend=backend_name)
    summary = evaluate(model, tokenizer, settings, progress=False, backend=backend)
    return summary["models"]["base"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per backend (the first is a warm-up)")
    parser.add_argument("--eval-problems", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="runs/bench-rollouts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grpo = {b: grpo_run(b, args.steps, args.threads, f"{args.output}/{b}") for b in BACKENDS}
    harness = {b: eval_run(b, args.eval_problems, args.eval_tokens) for b in BACKENDS}
    rows = []
    for b in BACKENDS:
        rows.append({"backend": b, **grpo[b], "eval tokens/s": harness[b]})
    fast, slow = grpo["llama.cpp"], grpo["transformers"]
    rows.append({"backend": "llama.cpp ÷ transformers", "step s": fast["step s"] / slow["step s"],
                 "generation s": fast["generation s"] / slow["generation s"], "rest s": fast["rest s"] / slow["rest s"],
                 "generated tokens/s": fast["generated tokens/s"] / slow["generated tokens/s"],
                 "eval tokens/s": harness["llama.cpp"] / harness["transformers"]})
    write("rollout_backends", "Rollout backends: GRPO step and eval harness, llama.cpp vs transformers (SmolLM2-135M)", rows,
          notes=f"GRPO: scripts/grpo.py defaults (16 completions x 32 tokens per step, bias on layers 1-29), {args.steps} steps "
                f"per backend, first left out, medians. Eval: greedy, {args.eval_problems} GSM8K test problems, up to "
                f"{args.eval_tokens} new tokens, batch 16. Threads: {args.threads}. Target: step ratio <= 0.3.",
          steps=args.steps, threads=args.threads)


if __name__ == "__main__":
    main()
