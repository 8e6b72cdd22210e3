"""Multi-process GRPO: completions per second with 2 processes (DDP over gloo) / 1 process, the demo's settings.

Each process keeps the demo's per-device batch (2 prompts x 8 completions), so 2 processes generate twice as many
completions per step; the cores are shared (threads per process = cores / processes). Steps after the first,
median of TRL's logged step_time. Run alone:  python benchmarks/multi_process.py
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import write

ROOT = Path(__file__).resolve().parent.parent


def run(processes: int, steps: int, backend: str) -> float:
    """Median seconds per step of `processes` DDP ranks."""
    output = tempfile.mkdtemp(prefix=f"bench-mp{processes}-")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(29600 + processes), str(ROOT / "scripts" / "grpo.py"), "--max_steps", str(steps), "--eval_limit", "0",
               "--save_strategy", "no", "--output_dir", output, "--rollout_backend", backend, "--disable_tqdm", "true"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-3000:]}")
    times = [float(t) for t in re.findall(r"'step_time': '([0-9.]+)'", proc.stdout + proc.stderr)]
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backend", default="auto", help="rollout backend of every run")
    args = parser.parse_args()
    per_step = 16  # per process: scripts/grpo.py's per_device_train_batch_size
    rows = []
    for processes in (1, 2):
        step = run(processes, args.steps, args.backend)
        rows.append({"processes": processes, "step s": step, "completions/s": per_step * processes / step})
    rows.append({"processes": "2 ÷ 1", "step s": rows[1]["step s"] / rows[0]["step s"],
                 "completions/s": rows[1]["completions/s"] / rows[0]["completions/s"]})
    write("multi_process", "GRPO with 2 processes vs 1 (DDP over gloo, SmolLM2-135M, 2 CPU cores)", rows,
          notes=f"Demo settings per process, {args.steps} steps, first left out, median step_time; rollout backend "
                f"{args.backend}; threads per process = {os.cpu_count()} cores / processes.", steps=args.steps)


if __name__ == "__main__":
    main()
