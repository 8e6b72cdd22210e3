"""A PEFT LoRA trained with the data, rewards and settings of a steering run: the reference users would pick instead.

GRPO is plain TRL (`GRPOTrainer(peft_config=...)`), SFT a plain transformers Trainer on the rows a steering SFT run
trains on (truncated prefixes included), so the comparison is against what users know. GRPO's rollouts come from the
backend a steering run would use: llama.cpp where it applies, with the adapter exported to it as a llama.cpp LoRA
after every step and TRL's importance sampling correcting for the sampler (as TRL does with vLLM), or TRL's own
transformers generation (`--rollout_backend transformers`). On llama.cpp `--dynamic_sampling` filters and refills
groups as a steering run does (the same code, grpo.DynamicSampling); the loss stays TRL's.
Run: python -m brep_rl.lora --config configs/evidence/grpo.yaml --output_dir runs/lora (the adapter lands there);
`brep-rl lora-sft --config configs/gsm8k/sft.yaml --output_dir runs/lora_sft` for SFT.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, set_seed
from trl import GRPOTrainer

from brep_rl.arguments import (
    GRPODataArguments,
    LoraArguments,
    ModelArguments,
    SFTDataArguments,
    SteeringGRPOConfig,
    SteeringSFTConfig,
    ValidationArguments,
)
from brep_rl.errors import ConfigError
from brep_rl.grpo import DynamicSampling, check_sampling, prompt_dataset, quiet_experimental
from brep_rl.lora_gguf import export_lora_gguf
from brep_rl.model import load_base
from brep_rl.rollout import Backend, TransformersBackend, make_backend
from brep_rl.sft import SFTCollator, report_heldout_loss, sft_problems, sft_rows
from brep_rl.training import add_validation, claim_output_dir, set_threads, train_and_save, zero3_enabled
from reward import guarded, reward_function, reward_functions


def run_lora_grpo(model_args: ModelArguments, lora_args: LoraArguments, data_args: GRPODataArguments,
                  train_args: SteeringGRPOConfig, val_args: ValidationArguments | None = None) -> Path:
    """Train the adapter, save it to output_dir; returns output_dir. With validation steps, the adapter with the best
    validation accuracy is kept in output_dir/best, as a steering run keeps its vectors."""
    if options := steering_only_options(data_args, train_args):
        raise ConfigError(f"{', '.join(options)}: the LoRA reference is TRL's GRPO (with dynamic sampling at most), "
                          f"which would ignore {'them' if len(options) > 1 else 'it'}; these are options of `brep-rl grpo` "
                          "(drop them here)")
    set_threads(model_args)
    model, tokenizer = load_base(model_args.model, dtype=model_args.dtype)
    model.train()
    problems = data_args.training_problems(train_args.seed)
    funcs, train_args.reward_weights = reward_functions(*data_args.reward_names(train_args.reward_weights), data_args.fallback,
                                                         data_args.allow_reward_imports)
    backend = make_backend(train_args.rollout_backend, model, tokenizer, model_args.model, [], torch.get_num_threads())
    if train_args.dynamic_sampling and isinstance(backend, TransformersBackend):
        raise ConfigError("--dynamic_sampling with a LoRA needs llama.cpp rollouts (--rollout_backend llama.cpp, or auto "
                          "with a GGUF base and llama-cpp-python installed): TRL's own generation cannot refill groups")
    claim_output_dir(train_args)
    set_seed(train_args.seed)  # TRL wraps the model in the adapter before its Trainer seeds anything
    kwargs = dict(model=model, args=train_args, processing_class=tokenizer, peft_config=lora_config(lora_args),
                  reward_funcs=[guarded(f) for f in funcs],
                  train_dataset=prompt_dataset(problems, data_args.instruction, data_args.system_prompt))
    if isinstance(backend, TransformersBackend):
        trainer = GRPOTrainer(**kwargs)
    else:
        trainer = LoraGRPOTrainer(backend=backend, accuracy_reward=reward_function("accuracy", data_args.fallback), **kwargs)
    add_validation(trainer, val_args, data_args, model_args, train_args.seed)
    return train_and_save(trainer)


def run_lora_sft(model_args: ModelArguments, lora_args: LoraArguments, data_args: SFTDataArguments,
                 train_args: SteeringSFTConfig, val_args: ValidationArguments | None = None) -> Trainer:
    """SFT of the adapter on a steering SFT run's rows, saved to output_dir. Prints the held-out loss of the base and
    of the adapter, as `brep-rl sft` does for vectors."""
    if data_args.solutions == "self":
        raise ConfigError("--solutions self: rejection sampling draws from the steering vectors a run starts from; the "
                          "LoRA reference trains on fixed targets (reference, scratchpad or stepwise)")
    claim_output_dir(train_args)
    set_threads(model_args)
    train_problems, heldout_problems = sft_problems(data_args, train_args.seed)
    model, tokenizer = load_base(model_args.model, dtype=model_args.dtype)
    train_rows, heldout_rows, _ = sft_rows(train_problems, heldout_problems, tokenizer, data_args, train_args.seed)
    set_seed(train_args.seed)  # the adapter's random init: a run's seed alone decides it, as it decides the data order
    model = get_peft_model(model, lora_config(lora_args))
    trainer = Trainer(model=model, args=train_args, train_dataset=train_rows, eval_dataset=heldout_rows or None,
                      data_collator=SFTCollator(tokenizer.pad_token_id, response_start=False), processing_class=tokenizer)
    add_validation(trainer, val_args, data_args, model_args, train_args.seed)
    output = train_and_save(trainer)
    if heldout_rows:
        report_heldout_loss(trainer, model.disable_adapter, "LoRA", len(heldout_rows), data_args)
    if trainer.is_world_process_zero():
        print(f"LoRA adapter: {output} (compare it with the base: `brep-rl eval --lora {output}`)")
    return trainer


class LoraGRPOTrainer(DynamicSampling, GRPOTrainer):
    """TRL's GRPOTrainer with its rollouts from an external backend (llama.cpp): the adapter being trained is exported
    to it as a llama.cpp LoRA after every step (so validation sees it too) and before a run's first generation (the
    adapter of a resumed checkpoint, which ZeRO-2 loads only after training has begun). With --dynamic_sampling the
    groups are filtered and refilled as a steering run's are (`accuracy_reward`: the binary reward they are filtered
    on)."""

    def __init__(self, *, backend: Backend, args: SteeringGRPOConfig, accuracy_reward=None, **kwargs):
        check_sampling(args, backend)
        with quiet_experimental():
            super().__init__(args=args, rollout_func=self._rollout, **kwargs)
        if zero3_enabled(self):
            raise ConfigError("--rollout_backend llama.cpp with a LoRA needs every rank to hold the whole adapter, "
                              "which ZeRO-3 shards: use ZeRO-2 or --rollout_backend transformers")
        self._init_rollouts(backend)
        self.tool = None
        self._init_dynamic_sampling(accuracy_reward)
        self._exported_at: int | None = None  # the step whose adapter the backend holds
        self._export_dir = tempfile.TemporaryDirectory(prefix="brep-rl-lora-")
        self.add_callback(_ExportEveryStep(self))

    def _generate_and_score_completions(self, inputs):
        if self._exported_at != self.state.global_step:  # a run's first generation, fresh or resumed
            self.export_adapter()
        return super()._generate_and_score_completions(inputs)

    def export_adapter(self) -> None:
        """The live adapter, as PEFT saves it, into the backend as a llama.cpp LoRA."""
        folder = Path(self._export_dir.name)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(folder)
        self.backend.use_lora(export_lora_gguf(folder, folder / "lora.gguf", model.config))
        self._exported_at = self.state.global_step


class _ExportEveryStep(TrainerCallback):
    def __init__(self, trainer: LoraGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.export_adapter()  # before validation's on_step_end, which generates with the backend


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    return LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
                      task_type="CAUSAL_LM")


def steering_only_options(data_args: GRPODataArguments, train_args: SteeringGRPOConfig) -> list[str]:
    """The flags set that only the steering trainer (SteeringGRPOTrainer and run_grpo) acts on."""
    set_flags = {
        "--demonstrations": train_args.demonstrations,
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


def sft_main(argv: list[str] | None = None) -> Trainer:
    """Tests (`brep-rl lora-sft` adds one-line errors)."""
    from brep_rl.cli import VERBS, parse

    return run_lora_sft(*parse("brep-rl lora-sft", VERBS["lora-sft"].types, argv))


if __name__ == "__main__":
    main()
