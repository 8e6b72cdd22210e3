"""Training curves of a run folder as a PNG: reward, accuracy, sampler/trainer gap or KL, and per-layer norms.

    python scripts/plot_run.py runs/demo            # writes runs/demo/curves.png
    python scripts/plot_run.py runs/demo/checkpoint-8
Reads trainer_state.json (the log history: written at the end of training, and in every checkpoint) and
norms.jsonl (per-layer norms, in the run folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brep_rl.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training output folder or one of its checkpoints")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run))
    except FileNotFoundError as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
