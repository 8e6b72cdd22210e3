"""The learning-evidence matrix: python scripts/evidence.py --config configs/evidence/smollm2_chain_sum.yaml (= `brep-rl evidence`)."""

import sys

from brep_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["evidence", *sys.argv[1:]]))
