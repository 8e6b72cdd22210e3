"""Evaluation harness entry point: `python scripts/evaluate.py ...` (same flags as `brep-rl eval`)."""

import sys

from brep_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
