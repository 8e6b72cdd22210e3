"""Run GRPO (same flags as scripts/grpo.py), then every rank saves the vectors it holds, for the multi-process tests.
RARE_HIT_ACCURACY=1 makes the accuracy reward (dynamic sampling's filter, the curriculum's signal) testing_utils.rare_hit,
which a random model earns now and then."""

import os
import sys

from safetensors.torch import save_file

from brep_rl import grpo
from brep_rl.grpo import main
from brep_rl.training import exit_rank

if __name__ == "__main__":
    if os.environ.get("RARE_HIT_ACCURACY"):
        from testing_utils import rare_hit

        grpo.reward_function = lambda name, fallback: rare_hit
    trainer = main(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    save_file(trainer.steer.state_tensors(), os.path.join(trainer.args.output_dir, f"rank{rank}.safetensors"))
    if trainer.is_deepspeed_enabled:  # the optimizer's own fp32 copy of the vectors (gathered: every rank calls it)
        from deepspeed.utils import safe_get_full_fp32_param

        master = {name: safe_get_full_fp32_param(p).contiguous() for name, p in trainer.steer.vectors().items()}
        save_file(master, os.path.join(trainer.args.output_dir, f"master{rank}.safetensors"))
    if trainer.curriculum is not None:
        print(f"rank {rank} curriculum level {trainer.curriculum.level} window {trainer.curriculum.state()['window']}")
    print(f"rank {rank} world {trainer.args.world_size} steps {trainer.state.global_step} engine {type(trainer.model_wrapped).__name__}")
    exit_rank(0)
