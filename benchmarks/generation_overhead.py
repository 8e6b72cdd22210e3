"""Generation overhead of steering: tokens/s of the steered model / the plain base (no hooks at all).

Same prompts, greedy, exactly `--tokens` new tokens per sequence; the variants are interleaved within each repeat
so that drift of the machine hits all of them alike; the median over repeats is reported. Target: >= 0.98.
Run alone (2 cores are easily oversubscribed): python benchmarks/generation_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import write

from brep_rl import SteeringConfig, SteeringVectors, load_base
from brep_rl.data import chat_prompt, load_task

MODES = ("bias", "prefix", "bias+prefix")


def timed_generate(model, enc, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return enc.input_ids.shape[0] * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats (5 left ±5%% noise in the medians)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_base("smollm2-135m")
    prompts = [chat_prompt(tokenizer, p.question) for p in load_task("gsm8k", "test", limit=8)]
    batches = {1: tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False),
               8: tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)}
    speeds: dict[tuple[int, str], list[float]] = {}
    timed_generate(model, batches[1], 4)  # warm-up
    for _ in range(args.repeats):
        for batch, enc in batches.items():
            for variant in ("base", *MODES):
                steer = None
                if variant != "base":
                    steer = SteeringVectors.attach(model, SteeringConfig(mode=variant, init="normal", init_std=0.01))
                speeds.setdefault((batch, variant), []).append(timed_generate(model, enc, args.tokens))
                if steer:
                    steer.detach()
    rows = []
    for batch in batches:
        base = statistics.median(speeds[(batch, "base")])
        for variant in ("base", *MODES):
            median = statistics.median(speeds[(batch, variant)])
            rows.append({"batch": batch, "variant": variant, "tokens/s (median)": median, "÷ base": median / base,
                         "min..max tokens/s": f"{min(speeds[(batch, variant)]):.1f}..{max(speeds[(batch, variant)]):.1f}"})
    write("generation_overhead", "Generation speed with steering hooks vs the plain base (SmolLM2-135M, transformers, greedy)",
          rows, notes=f"{args.repeats} interleaved repeats, {args.tokens} new tokens per sequence, target ÷ base >= 0.98.",
          repeats=args.repeats, tokens=args.tokens)


if __name__ == "__main__":
    main()
