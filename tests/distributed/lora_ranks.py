"""Run the LoRA reference's GRPO (same flags as `brep-rl lora`), then every rank saves the adapter it holds, for the
multi-process tests."""

import os
import sys

from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import Trainer

from brep_rl import lora
from brep_rl.training import exit_rank

if __name__ == "__main__":
    trainers: list[Trainer] = []
    real_train_and_save = lora.train_and_save
    lora.train_and_save = lambda trainer: trainers.append(trainer) or real_train_and_save(trainer)
    lora.main(sys.argv[1:])
    trainer, rank = trainers[0], int(os.environ.get("RANK", "0"))
    adapter = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    save_file({k: v.detach().contiguous() for k, v in adapter.items()},
              os.path.join(trainer.args.output_dir, f"rank{rank}.safetensors"))
    print(f"rank {rank} world {trainer.args.world_size} steps {trainer.state.global_step} engine {type(trainer.model_wrapped).__name__}")
    exit_rank(0)
