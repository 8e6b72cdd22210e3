"""Training curves of a run folder as a PNG: reward, accuracy, sampler/trainer gap or KL, and per-layer norms.

    python scripts/plot_run.py runs/demo            # writes runs/demo/curves.png
    python scripts/plot_run.py runs/demo/checkpoint-8
    python scripts/plot_run.py --validation sft=runs/sft sft+grpo=runs/sft_grpo --after sft+grpo=48,509 --out v.png
Reads trainer_state.json (the log history: written at the end of training, and in every checkpoint) and
norms.jsonl (per-layer norms, in the run folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brep_rl.plots import plot_run, plot_validation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a training output folder or one of its checkpoints")
    parser.add_argument("--validation", nargs="+", metavar="LABEL=RUN", help="validation accuracy of runs on one figure")
    parser.add_argument("--after", nargs="+", default=[], metavar="LABEL=STEPS,SECONDS",
                        help="draw LABEL's run after a stage of STEPS optimizer steps and SECONDS of wall-clock")
    parser.add_argument("--out", type=Path, default=Path("validation.png"))
    args = parser.parse_args(argv)
    if (args.run is None) == (args.validation is None):
        parser.error("give a run folder, or --validation LABEL=RUN ...")
    after = {}
    for item in args.after:
        label, _, start = item.partition("=")
        steps, _, seconds = start.partition(",")
        try:
            after[label] = (int(steps), float(seconds))
        except ValueError:
            parser.error(f"--after {item!r}: expected LABEL=STEPS,SECONDS, e.g. sft+grpo=48,509")
    try:
        if args.validation:
            runs = dict(item.split("=", 1) if "=" in item else (item, item) for item in args.validation)
            if unknown := set(after) - set(runs):
                parser.error(f"--after names {sorted(unknown)}, not among the --validation labels {sorted(runs)}")
            print(plot_validation({label: Path(run) for label, run in runs.items()}, args.out, after))
        else:
            print(plot_run(args.run))
    except FileNotFoundError as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
