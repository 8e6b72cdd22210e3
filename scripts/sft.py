"""SFT entry point: `accelerate launch scripts/sft.py --config configs/sft_smollm2.yaml [--key value ...]` (= `brep-rl sft`)."""

import sys

from brep_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
