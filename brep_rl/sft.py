"""SFT of steering vectors on truncated answer prefixes (BREP's first stage; also usable on its own).

With probability `truncate_prob` an example keeps its loss on the first `truncate_tokens` answer tokens
only (and the tokens after them are not fed at all: with causal attention they cannot change the loss);
otherwise the loss covers the whole answer. Prompt tokens never carry loss. Only the vectors train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from brep_rl.arguments import (
    EvalSettings,
    ModelArguments,
    SFTDataArguments,
    SteeringArguments,
    SteeringSFTConfig,
    ValidationArguments,
)
from brep_rl.checkpoints import SELF_SOLUTIONS
from brep_rl.data import DEFAULT_INSTRUCTION, Problem, chat_prompt_ids, prompt_batch, with_scratchpads
from brep_rl.errors import ConfigError, DataError
from brep_rl.files import write_json
from brep_rl.rollout import Calculator, Sampling, generate_each, hash_seed, make_backend
from brep_rl.training import (
    SteeringTrainerMixin,
    add_validation,
    claim_output_dir,
    final_eval,
    launched_as_main,
    load_for_training,
    train_and_save,
)
from reward import reward_function

logger = logging.getLogger(__name__)


@dataclass
class SFTStats:
    examples: int = 0
    no_solution: int = 0
    prompt_too_long: int = 0
    answer_cut: int = 0
    truncated: int = 0
    shorter_than_truncation: int = 0
    loss_tokens: int = 0

    def describe(self, max_length: int, truncate_tokens: int) -> str:
        return (
            f"{self.examples} SFT examples ({self.truncated} truncated to {truncate_tokens} answer tokens, "
            f"{self.shorter_than_truncation} answers shorter than that, {self.loss_tokens} loss tokens); "
            f"dropped {self.no_solution} without a worked solution and {self.prompt_too_long} with prompts of "
            f">= {max_length} tokens; {self.answer_cut} answers cut at max_length"
        )


def build_sft_examples(
    problems: list[Problem], tokenizer, truncate_prob: float, truncate_tokens: int, max_length: int,
    instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None, seed: int = 0,
) -> tuple[list[dict[str, list[int] | int]], SFTStats]:
    """Tokenized examples {input_ids, labels, response_start}; labels are -100 wherever there is no loss."""
    if not 0 <= truncate_prob <= 1:
        raise ValueError(f"truncate_prob: expected a probability in [0, 1], got {truncate_prob}")
    if truncate_tokens < 1 or max_length < 2:
        raise ValueError(f"truncate_tokens must be >= 1 and max_length >= 2, got {truncate_tokens} and {max_length}")
    rng = random.Random(seed)  # the truncation draw is fixed per example, so a resumed run sees the same data
    stats, examples = SFTStats(), []
    eos = tokenizer.eos_token_id
    for problem in problems:
        if not problem.solution:
            stats.no_solution += 1
            continue
        prompt = chat_prompt_ids(tokenizer, [problem], instruction, system_prompt)[0]
        answer = tokenizer(problem.solution, add_special_tokens=False).input_ids + [eos]
        truncated = rng.random() < truncate_prob
        if len(prompt) >= max_length:
            stats.prompt_too_long += 1
            continue
        room = max_length - len(prompt)
        if len(answer) > room:
            stats.answer_cut += 1
            answer = answer[:room]
        if truncated:
            stats.truncated += 1
            stats.shorter_than_truncation += len(answer) <= truncate_tokens
            answer = answer[:truncate_tokens]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "response_start": len(prompt)})
        stats.examples += 1
        stats.loss_tokens += len(answer)
    return examples, stats


class SFTCollator:
    """Right-pads a batch; padding positions get attention_mask 0 and label -100. `response_start` (where each
    answer begins) is for the steering trainer's prefix window; a plain Trainer's model takes no such input."""

    def __init__(self, pad_token_id: int, response_start: bool = True):
        self.pad_token_id = pad_token_id
        self.response_start = response_start

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.response_start:
            batch["response_start"] = torch.tensor([r["response_start"] for r in rows], dtype=torch.long)
        return batch


class SteeringSFTTrainer(SteeringTrainerMixin, Trainer):
    def __init__(self, *args, steer, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_steering(steer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        starts = inputs.pop("response_start")
        with self.steer.window(starts):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        penalty = self.steer.penalty_term(model.training)
        return (result[0] + penalty, result[1]) if return_outputs else result + penalty


def self_solutions(problems: list[Problem], model, tokenizer, steer, model_name: str, data_args: SFTDataArguments,
                   seed: int) -> list[Problem]:
    """Rejection sampling (STaR / RFT): each problem's solution becomes the first of `self_samples` completions of the
    model (with the vectors training starts from) that the accuracy reward accepts; problems without one are dropped.
    A problem's samples are seeded by its id, and the next problem starts as soon as one finishes (llama.cpp)."""
    backend = make_backend("auto", model, tokenizer, model_name, [steer.config], torch.get_num_threads())
    backend.sync(steer)
    accuracy = reward_function("accuracy", "last_number")
    tool = Calculator(tokenizer) if data_args.self_calculator else None
    k = data_args.self_samples
    sampling = Sampling(data_args.self_max_new_tokens, data_args.self_temperature)
    ids = chat_prompt_ids(tokenizer, problems, data_args.instruction, data_args.system_prompt)
    seeds = [hash_seed(seed, "rft", p.id) for p in problems]
    right: dict[int, str] = {}
    each = generate_each(backend, ids, k, sampling, seeds, running=128, tool=tool)  # 128 sequences: bounded memory
    for index, rollouts in tqdm(each, total=len(problems), desc="rejection sampling", unit="problem"):
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        scores = accuracy(completions=texts, answer=[problems[index].answer] * k)
        hit = next((text for text, score in zip(texts, scores) if score), None)
        if hit is not None:
            right[index] = hit.strip()
    kept = [dataclasses.replace(problems[i], solution=right[i]) for i in sorted(right)]
    logger.warning("rejection sampling: %d of %d problems have a correct sample (%d samples each, temperature %s)",
                   len(kept), len(problems), k, data_args.self_temperature)
    return kept


def kept_self_solutions(problems: list[Problem], model, tokenizer, steer, model_args: ModelArguments,
                        steer_args: SteeringArguments, data_args: SFTDataArguments,
                        train_args: SteeringSFTConfig) -> list[Problem]:
    """`self_solutions`, kept in output_dir/self_solutions.json: a resumed run trains on the samples it drew (on
    GSM8K the draw was 36 of a run's 46 min) instead of drawing them again, and they can be read."""
    path = Path(train_args.output_dir) / SELF_SOLUTIONS
    settings = {"model": model_args.model, "init_from": steer_args.init_from, "seed": train_args.seed,
                "samples": data_args.self_samples, "temperature": data_args.self_temperature,
                "max_new_tokens": data_args.self_max_new_tokens, "calculator": data_args.self_calculator,
                "problems": hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()}
    if train_args.resume_from_checkpoint and path.exists():
        stored = json.loads(path.read_text())
        changed = {k: (stored["settings"].get(k), v) for k, v in settings.items() if stored["settings"].get(k) != v}
        if changed:
            shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(f"{path} holds samples drawn with other settings ({shown}): resume with the run's own "
                              "settings, or start a new --output_dir")
        by_id = {p.id: p for p in problems}
        logger.warning("rejection sampling: %d correct samples read from %s", len(stored["solutions"]), path)
        return [dataclasses.replace(by_id[i], solution=text) for i, text in stored["solutions"]]
    kept = self_solutions(problems, model, tokenizer, steer, model_args.model, data_args, train_args.seed)
    if launched_as_main():
        write_json(path, {"settings": settings, "solutions": [[p.id, p.solution] for p in kept]})
    return kept


def sft_problems(data_args: SFTDataArguments, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) problems with their targets; the held-out ones from the end of the selection."""
    problems = data_args.load_problems(seed, data_args.solution_field)
    if data_args.solutions in ("scratchpad", "stepwise"):
        problems = with_scratchpads(problems, data_args.task, data_args.solutions)
    if data_args.heldout >= len(problems):
        raise DataError(f"heldout={data_args.heldout} leaves no training problems out of {len(problems)}")
    return problems[: len(problems) - data_args.heldout], problems[len(problems) - data_args.heldout :]


def sft_rows(train_problems: list[Problem], heldout_problems: list[Problem], tokenizer, data_args: SFTDataArguments,
             seed: int) -> tuple[list[dict], list[dict], SFTStats]:
    """(training rows, held-out rows, the training rows' stats); refuses a selection that leaves no training row."""

    def rows(problems: list[Problem], draw_seed: int):
        return build_sft_examples(problems, tokenizer, data_args.truncate_prob, data_args.truncate_tokens,
                                  data_args.max_length, data_args.instruction, data_args.system_prompt, draw_seed)

    train_rows, stats = rows(train_problems, seed)
    heldout_rows, _ = rows(heldout_problems, seed + 1)
    described = stats.describe(data_args.max_length, data_args.truncate_tokens)
    logger.warning("SFT data: %s", described)
    if not train_rows:
        raise DataError(f"task {data_args.task!r}: no usable SFT examples ({described})")
    return train_rows, heldout_rows, stats


def report_heldout_loss(trainer: Trainer, base_only: Callable[[], AbstractContextManager], label: str, rows: int,
                        data_args: SFTDataArguments) -> None:
    """The held-out SFT loss of the base (inside `base_only()`) and of the trained model, printed by the main process.
    Call it on every rank (evaluation is collective), after training: an evaluate() ahead of train() marks the model
    as prepared by accelerate, which then skips the DDP wrap."""
    with base_only():
        before = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    after = trainer.evaluate(metric_key_prefix=label.lower())[f"{label.lower()}_loss"]
    if trainer.is_world_process_zero():
        print(f"\nheld-out SFT loss ({rows} {data_args.task} {data_args.split} problems never trained on): "
              f"base {before:.4f} -> {label} {after:.4f}")


def run_sft(model_args: ModelArguments, steer_args: SteeringArguments, data_args: SFTDataArguments, train_args: SteeringSFTConfig, val_args: ValidationArguments | None = None) -> SteeringSFTTrainer:
    """Train, save the artifact to output_dir, report held-out loss before/after and (main process) a short eval."""
    claim_output_dir(train_args)
    train_problems, heldout_problems = sft_problems(data_args, train_args.seed)

    def calibration(tokenizer):
        return prompt_batch(tokenizer, train_problems[:8], data_args.instruction, data_args.system_prompt)

    model, tokenizer, steer = load_for_training(model_args, steer_args, calibration)
    if data_args.solutions == "self":
        train_problems = kept_self_solutions(train_problems, model, tokenizer, steer, model_args, steer_args, data_args, train_args)
    train_rows, heldout_rows, stats = sft_rows(train_problems, heldout_problems, tokenizer, data_args, train_args.seed)
    steer.config.provenance = {**steer.config.provenance, "stage": "sft", **data_args.provenance(), "examples": stats.examples,
                               "solutions": data_args.solutions, "truncate_prob": data_args.truncate_prob,
                               "truncate_tokens": data_args.truncate_tokens}

    trainer = SteeringSFTTrainer(
        model=model, args=train_args, train_dataset=train_rows, eval_dataset=heldout_rows or None,
        data_collator=SFTCollator(tokenizer.pad_token_id), steer=steer, processing_class=tokenizer,
    )
    add_validation(trainer, val_args, data_args, model_args, train_args.seed)
    output = train_and_save(trainer)
    if heldout_rows:
        report_heldout_loss(trainer, steer.disabled, "steered", len(heldout_rows), data_args)
    if not trainer.is_world_process_zero():
        return trainer
    print(f"steering artifact: {output} (inspect it with `brep-rl inspect {output}`)")
    if data_args.eval_limit > 0:
        final_eval(trainer, tokenizer, EvalSettings(
            task=data_args.eval_task, split=data_args.eval_split, limit=data_args.eval_limit,
            max_new_tokens=data_args.eval_max_new_tokens, instruction=data_args.instruction,
            system_prompt=data_args.system_prompt, rg_config=data_args.eval_rg_config, seed=train_args.seed,
        ))
    return trainer


def main(argv: list[str] | None = None) -> SteeringSFTTrainer:
    """`scripts/sft.py` and tests: --config YAML plus command-line overrides (`brep-rl sft` adds one-line errors)."""
    from brep_rl.cli import VERBS, parse

    return run_sft(*parse("brep-rl sft", VERBS["sft"].types, argv))
