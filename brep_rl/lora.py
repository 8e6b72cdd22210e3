"""GRPO of a PEFT LoRA with the data, rewards and settings of a steering run: the reference users would pick instead.

Plain TRL (`GRPOTrainer(peft_config=...)`, TRL's own generation), so the comparison is against what users know.
Run: python -m brep_rl.lora --config configs/evidence/grpo.yaml --output_dir runs/lora (the adapter lands there).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from trl import GRPOTrainer

from brep_rl.arguments import GRPODataArguments, LoraArguments, ModelArguments, SteeringGRPOConfig, ValidationArguments
from brep_rl.errors import ConfigError
from brep_rl.grpo import prompt_dataset
from brep_rl.model import load_base
from brep_rl.training import add_validation, claim_output_dir, train_and_save
from reward import guarded, reward_functions


def run_lora_grpo(model_args: ModelArguments, lora_args: LoraArguments, data_args: GRPODataArguments,
                  train_args: SteeringGRPOConfig, val_args: ValidationArguments | None = None) -> Path:
    """Train the adapter, save it to output_dir; returns output_dir. With validation steps, the adapter with the best
    validation accuracy is kept in output_dir/best, as a steering run keeps its vectors."""
    if options := steering_only_options(data_args, train_args):
        raise ConfigError(f"{', '.join(options)}: the LoRA reference is plain TRL GRPO, which would ignore "
                          f"{'them' if len(options) > 1 else 'it'}; these are options of `brep-rl grpo` (drop them here)")
    if train_args.rollout_backend not in ("auto", "transformers"):
        raise ConfigError("--rollout_backend: LoRA rollouts run through TRL's own generation (auto or transformers), "
                          f"got {train_args.rollout_backend!r}")
    claim_output_dir(train_args)
    if model_args.threads:
        torch.set_num_threads(model_args.threads)
    model, tokenizer = load_base(model_args.model, dtype=model_args.dtype)
    model.train()
    problems = data_args.training_problems(train_args.seed)
    funcs, train_args.reward_weights = reward_functions(*data_args.reward_names(train_args.reward_weights), data_args.fallback,
                                                         data_args.allow_reward_imports)
    peft_config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
                             task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, args=train_args, processing_class=tokenizer, peft_config=peft_config,
        reward_funcs=[guarded(f) for f in funcs], train_dataset=prompt_dataset(problems, data_args.instruction, data_args.system_prompt),
    )
    add_validation(trainer, val_args, data_args, model_args, train_args.seed)
    return train_and_save(trainer)


def steering_only_options(data_args: GRPODataArguments, train_args: SteeringGRPOConfig) -> list[str]:
    """The flags set that only the steering trainer (SteeringGRPOTrainer and run_grpo) acts on."""
    set_flags = {
        "--dynamic_sampling": train_args.dynamic_sampling, "--demonstrations": train_args.demonstrations,
        "--hint_share": train_args.hint_share > 0, "--calculator": train_args.calculator,
        "--curriculum": data_args.curriculum is not None, "--solutions": data_args.solutions != "reference",
        "--train_on_failures": data_args.train_on_failures is not None,
    }
    return [flag for flag, is_set in set_flags.items() if is_set]


def load_merged(model_name: str, adapter: str | Path, dtype: str = "float32"):
    """The base with a saved adapter merged in, for the eval harness: (model, tokenizer)."""
    model, tokenizer = load_base(model_name, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval(), tokenizer


def main(argv: list[str] | None = None) -> Path:
    """`python -m brep_rl.lora` and tests (`brep-rl lora` adds one-line errors)."""
    from brep_rl.cli import VERBS, parse

    return run_lora_grpo(*parse("brep-rl lora", VERBS["lora"].types, argv))


if __name__ == "__main__":
    main()
