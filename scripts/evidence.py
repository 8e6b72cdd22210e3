"""The learning-evidence matrix (issue #8): python scripts/evidence.py --config configs/evidence/smollm2_chain_sum.yaml"""

import sys

from brep_rl.evidence import main

if __name__ == "__main__":
    sys.exit(main())
