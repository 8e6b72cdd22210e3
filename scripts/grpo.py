"""GRPO entry point, the project's main job: `accelerate launch scripts/grpo.py [--config configs/<name>.yaml] [--key value ...]`.

With no arguments it trains bias vectors on SmolLM2-135M for reasoning-gym chain_sum (2 terms, 1-2 digits)
and ends with base vs steered accuracy on held-out problems. Same flags as `brep-rl grpo`.
"""

import sys

from brep_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["grpo", *sys.argv[1:]]))
