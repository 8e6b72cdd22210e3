"""What a GRPO step costs: steering vectors vs TRL + PEFT LoRA vs full fine-tuning, identical settings, one run.

Every variant runs TRL's GRPOTrainer on SmolLM2-135M with the demo's settings (rg chain_sum, 2 prompts x 8
completions of up to 32 tokens per step, T=0.7) and transformers generation, each in a fresh process so that its
peak RSS is its own. Reported: seconds per step (generation and the rest), peak RSS, trainable parameters,
optimizer-state bytes, saved-model bytes. Steering runs twice at beta = 0: with its packed micro-batches (the
default, which leave out rows whose advantage is 0) and with TRL's. Then the KL reference: peak RSS with beta > 0 /
beta = 0 for steering (its reference is the same model with steering off; set against the run that, like beta > 0,
trains every row) and for full fine-tuning (TRL loads a second model).
Targets: steering step <= 0.8x LoRA and <= 0.5x full; steering RSS ratio with KL <= 1.05.
The first step of each run is a warm-up and left out. Run alone:  python benchmarks/grpo_cost.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (kind, beta, rollout backend, packed micro-batches)
    "steering": ("steering", 0.0, "transformers", True),
    "steering, TRL's micro-batches": ("steering", 0.0, "transformers", False),
    "steering, llama.cpp rollouts": ("steering", 0.0, "llama.cpp", True),
    "LoRA r=16 all-linear": ("lora", 0.0, "transformers", False),
    "full fine-tuning": ("full", 0.0, "transformers", False),
    "steering, beta=0.04": ("steering", 0.04, "transformers", True),
    "full fine-tuning, beta=0.04": ("full", 0.04, "transformers", False),
}
LEARNING_RATES = {"steering": 3e-3, "lora": 1e-4, "full": 1e-6}


def child(kind: str, beta: float, backend: str, packed: bool, steps: int, threads: int) -> dict:
    """One training run in this process; returns its measurements."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from brep_rl.arguments import (
        CHAIN_SUM_2X2,
        GRPODataArguments,
        ModelArguments,
        SteeringArguments,
        SteeringGRPOConfig,
    )
    from brep_rl.grpo import SteeringGRPOTrainer, prompt_dataset
    from brep_rl.rollout import make_backend
    from brep_rl.training import load_for_training, quiet_dependency_warnings
    from reward import reward_functions

    quiet_dependency_warnings()
    torch.set_num_threads(threads)
    output = tempfile.mkdtemp(prefix="grpo-cost-")
    args = SteeringGRPOConfig(output_dir=output, max_steps=steps, beta=beta, learning_rate=LEARNING_RATES[kind],
                              pack_micro_batches=packed, save_strategy="no", report_to="none", disable_tqdm=True,
                              logging_steps=1000)
    data = GRPODataArguments(rg_config=CHAIN_SUM_2X2)
    problems = data.load_problems(args.seed)
    funcs, args.reward_weights = reward_functions(*data.reward_names(None), data.fallback)
    common = dict(args=args, reward_funcs=funcs, train_dataset=prompt_dataset(problems, data.instruction, None))

    model, tokenizer, steer = load_for_training(ModelArguments(threads=threads), SteeringArguments())
    if kind == "steering":
        backend = make_backend(backend, model, tokenizer, "smollm2-135m", [steer.config], threads)
        trainer = SteeringGRPOTrainer(model=model, steer=steer, backend=backend, processing_class=tokenizer, **common)
    else:
        steer.detach()
        model.train()
        peft_config = None
        if kind == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, peft_config=peft_config, **common)

    steps_seen: list[float] = []
    generation: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps_seen.append(time.perf_counter() - self.start)

    original = type(trainer)._generate

    def timed(self, prompts):
        start = time.perf_counter()
        out = original(self, prompts)
        generation.append(time.perf_counter() - start)
        return out

    type(trainer)._generate = timed
    trainer.add_callback(Timer())
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in trainer.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    saved = Path(output) / "saved"
    trainer.save_model(str(saved))
    step, gen = statistics.median(steps_seen[1:]), statistics.median(generation[1:])
    return {
        "step s": step, "generation s": gen, "rest s": step - gen,
        "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable params": trainable, "optimizer MB": optimizer_bytes / 2**20,
        "saved MB": sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BETA", "BACKEND", "PACKED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, beta, backend, packed = args.child
        print("RESULT " + json.dumps(child(kind, float(beta), backend, packed == "True", args.steps, args.threads)))
        return

    from report import write

    results = {}
    for name, (kind, beta, backend, packed) in VARIANTS.items():
        print(f"--- {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                               "--child", kind, str(beta), backend, str(packed)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
        print(results[name], flush=True)
    rows = [{"variant": name, **r} for name, r in results.items()]
    steering, unpacked = results["steering"], results["steering, TRL's micro-batches"]
    lora, full = results["LoRA r=16 all-linear"], results["full fine-tuning"]
    # the reference's memory: beta > 0 keeps every row in the loss, so it is set against the run that trains every row
    kl_steering = results["steering, beta=0.04"]["peak RSS GB"] / unpacked["peak RSS GB"]
    kl_full = results["full fine-tuning, beta=0.04"]["peak RSS GB"] / full["peak RSS GB"]
    notes = (f"Steering step ÷ LoRA: {steering['step s'] / lora['step s']:.2f} (target <= 0.8; with TRL's "
             f"micro-batches {unpacked['step s'] / lora['step s']:.2f}); ÷ full: {steering['step s'] / full['step s']:.2f} "
             f"(target <= 0.5; {unpacked['step s'] / full['step s']:.2f}). Peak RSS with beta=0.04 ÷ beta=0, both "
             f"training every row: steering {kl_steering:.3f} (target <= 1.05), full fine-tuning {kl_full:.3f}. "
             f"{args.steps} steps per variant, first left out, medians; transformers generation unless named; torch "
             f"threads {args.threads}; fp32. Packed micro-batches (brep-rl's default) leave out the rows whose "
             f"advantage is 0 when beta is 0: the same update, fewer rows run; LoRA and full fine-tuning run TRL's own.")
    write("grpo_cost", "GRPO step cost: steering vs LoRA vs full fine-tuning (SmolLM2-135M, 2 CPU cores)", rows,
          notes=notes, steps=args.steps, threads=args.threads)


if __name__ == "__main__":
    main()
