"""What packing micro-batches by completion length (brep_rl/packing.py) saves on a real GRPO step: the GSM8K
group-of-32 config (SmolLM2, llama.cpp rollouts with the calculator, 2 prompts x 32 generations, 4 micro-batches of 16,
192 tokens) for its first steps with `--pack_micro_batches` false, then true, from the same start and seed. The first
step's rollouts are the same both ways (they come before any update), so its loss must agree and its time is the
comparison; later steps sample from vectors equal only up to float rounding and may diverge. Run alone:
    python benchmarks/packing.py [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch
from report import write

from brep_rl.grpo import main as grpo_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gsm8k" / "grpo_group32.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the config's paths (init_from) are the repository root's
    rows = []
    with tempfile.TemporaryDirectory() as output:
        for packing in ("false", "true"):
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = grpo_main(["--config", str(CONFIG), "--max_steps", str(args.steps), "--save_steps", "1000",
                                     "--output_dir", f"{output}/{packing}", "--pack_micro_batches", packing,
                                     "--threads", str(args.threads), "--disable_tqdm", "true"])
            for log in (h for h in trainer.state.log_history if "loss" in h):
                rows.append({"packing": packing, "step": log["step"], "step s": log["step_time"], "loss": log["loss"],
                             "rows trained": log.get("packing/rows", 1.0), "positions run": log.get("packing/cells", 1.0),
                             "mean completion tokens": log["completions/mean_length"]})
    first = {row["packing"]: row for row in rows if row["step"] == 1}
    notes = (f"Step 1 (the same rollouts both ways): {first['false']['step s']:.1f} s -> {first['true']['step s']:.1f} s, "
             f"{first['false']['step s'] / first['true']['step s']:.2f}x; loss {first['false']['loss']:.6f} vs "
             f"{first['true']['loss']:.6f}. `step s` includes generation (llama.cpp) and the refill round.")
    write("packing", "GRPO step with micro-batches packed by completion length (GSM8K, groups of 32)", rows, notes,
          steps=args.steps, threads=args.threads, config=str(CONFIG.name))


if __name__ == "__main__":
    main()
