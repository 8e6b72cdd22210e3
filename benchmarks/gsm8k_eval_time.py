"""How long `brep-rl eval` takes on all of GSM8K test (issue #17's target: <= 20 min per variant on 2 cores),
projected from its first problems: the base, then a steering artifact, greedy, llama.cpp, the settings of `make gsm8k`
(256 new tokens, batch 64). Each variant is timed end to end through the harness (prompts, generation, scoring).
Run alone:
    python benchmarks/gsm8k_eval_time.py [--problems 128] [--steering ../artifacts/smollm2-gsm8k]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from report import write

from brep_rl import load_base
from brep_rl.arguments import EvalSettings
from brep_rl.evaluate import evaluate
from brep_rl.rollout import make_backend
from brep_rl.steering import read_artifact

GSM8K_TEST = 1319


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=128, help="the first N GSM8K test problems")
    parser.add_argument("--steering", default="../artifacts/smollm2-gsm8k")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_base("smollm2-135m")
    backend = make_backend("llama.cpp", model, tokenizer, "smollm2-135m", [read_artifact(args.steering)[0]], args.threads)
    settings = EvalSettings(task="gsm8k", split="test", limit=args.problems, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, backend="llama.cpp")
    rows = []
    with tempfile.TemporaryDirectory() as output:
        # the second call finds the base's records in `output` and generates only the steered variant
        for label, artifacts in (("base", []), ("steered", [args.steering])):
            start = time.perf_counter()
            summary = evaluate(model, tokenizer, settings, artifacts, output=output, progress=False, backend=backend)
            seconds = time.perf_counter() - start
            result = list(summary["models"].values())[-1]  # the variant this call added
            rows.append({"variant": label, "problems": args.problems, "mean tokens": result["mean_tokens"],
                         "seconds": seconds, "s per problem": seconds / args.problems,
                         "full test, min (projected)": seconds / args.problems * GSM8K_TEST / 60})
    backend.close()
    write("gsm8k_eval_time", "Eval harness on GSM8K test: time per variant, projected to all 1,319 problems", rows,
          notes=f"SmolLM2-135M on llama.cpp (fp32), greedy, up to {args.max_new_tokens} new tokens, batch "
                f"{args.batch_size}, the first {args.problems} test problems, steered = {args.steering}. Threads: "
                f"{args.threads}. Target (issue #17): <= 20 min per variant.",
          problems=args.problems, threads=args.threads, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
