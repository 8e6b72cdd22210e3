"""Run SFT (same flags as scripts/sft.py), then every rank saves the vectors it holds, for the DDP test."""

import os
import sys

from safetensors.torch import save_file

from brep_rl.sft import main
from brep_rl.training import exit_rank

if __name__ == "__main__":
    trainer = main(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    save_file(trainer.steer.state_tensors(), os.path.join(trainer.args.output_dir, f"rank{rank}.safetensors"))
    print(f"rank {rank} world {trainer.args.world_size} steps {trainer.state.global_step}")
    exit_rank(0)
