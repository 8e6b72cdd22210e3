"""Validation during training: every N optimizer steps, greedy accuracy of the current vectors on held-out problems,
through the rollout backend, and with --validation_samples k also pass@k of k sampled answers (the share of problems
some sample gets right: where GRPO can find a signal); `validation.jsonl` gets (step, accuracy, the share of greedy
answers in the final-answer format, pass@k, wall-clock seconds) and the best vectors so far by --validation_pick are
saved to `output_dir/best` (the checkpoint a long run should be judged by, chosen without the test split). A LoRA
reference run validates the same way, its adapter kept.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from brep_rl.arguments import ValidationArguments
from brep_rl.checkpoints import StepLog
from brep_rl.data import Problem, chat_prompt_ids
from brep_rl.metrics import pass_at_k
from brep_rl.rollout import Backend, Sampling, TransformersBackend, hash_seed
from reward import has_final_answer_format, reward_function

logger = logging.getLogger(__name__)

VALIDATION = "validation.jsonl"
BEST = "best"
SFT_VALIDATION_TOKENS = 32  # an SFT run has no completion length; --validation_max_new_tokens sets a longer one


class ValidationCallback(TrainerCallback):
    """Runs on the main process only; skipped under ZeRO-3, where generating needs every rank."""

    def __init__(self, trainer, problems: list[Problem], args: ValidationArguments, instruction: str | None,
                 system_prompt: str | None, fallback: str, backend: Backend | None = None):
        self.trainer = trainer
        self.problems = problems
        self.every = args.validation_steps
        max_new_tokens = (args.validation_max_new_tokens or getattr(trainer.args, "max_completion_length", None)
                          or SFT_VALIDATION_TOKENS)
        self.sampling = Sampling(max_new_tokens, temperature=0.0)
        self.samples = args.validation_samples
        # one seed for every validation of the run: the steps differ by their vectors, not by luck of the draw
        self.sampled = Sampling(max_new_tokens, temperature=args.validation_temperature,
                                seed=hash_seed(trainer.args.seed, "validation"))
        self.pick = args.validation_pick
        tokenizer = trainer.processing_class
        self.prompt_ids = chat_prompt_ids(tokenizer, problems, instruction, system_prompt)
        self.accuracy = reward_function("accuracy", fallback)
        self.backend = backend
        self.log = StepLog(Path(trainer.args.output_dir) / VALIDATION)
        self.started = time.perf_counter()
        self.elapsed_before = 0.0  # wall-clock of the run before a resume

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.log.start(state.global_step)
            self.elapsed_before = max((row["seconds"] for row in self.log.rows.values()), default=0.0)
            self.started = time.perf_counter()
            if state.global_step == 0:  # where training starts from (the base, or the vectors of --init_from)
                self.validate(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self.validate(args, state)

    def validate(self, args, state) -> None:
        row = self.measure()
        metric = self.pick  # "accuracy" or "pass@k": the names of the row's fields
        best = max((previous[metric] for previous in self.log.rows.values()), default=-1.0)
        seconds = self.elapsed_before + time.perf_counter() - self.started
        self.log.record(state.global_step, {**row, "n": len(self.problems), "seconds": round(seconds, 1)})
        line = (f"validation at step {state.global_step}: {row['accuracy']:.1%} of {len(self.problems)} (greedy), "
                f"format {row['format']:.0%}")
        if self.samples:
            line += f", pass@{self.samples} {row['pass@k']:.1%} (per sample {row['sample_accuracy']:.1%})"
        if row[metric] > best:
            self.save_best(Path(args.output_dir) / BEST, row)
            line += f", best so far: saved to {Path(args.output_dir) / BEST}"
        print(line, flush=True)

    def save_best(self, directory: Path, row: dict[str, float]) -> None:
        """The steering vectors with their validation scores in the provenance, or a LoRA reference's adapter."""
        steer = getattr(self.trainer, "steer", None)
        if steer is None:
            self.trainer.accelerator.unwrap_model(self.trainer.model).save_pretrained(directory)
            return
        steer.config.provenance.update({**self.trainer.provenance(), "validation_accuracy": row["accuracy"],
                                        **({"validation_pass@k": row["pass@k"]} if self.samples else {})})
        steer.save_pretrained(directory)

    def measure(self) -> dict[str, float]:
        """Greedy accuracy and format rate; with samples, pass@k (k = samples) and the accuracy per sample too."""
        backend = self.backend or TransformersBackend(self.trainer.accelerator.unwrap_model(self.trainer.model),
                                                      self.trainer.processing_class)
        backend.sync(getattr(self.trainer, "steer", None))  # the vectors as they are after this step
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            scores, texts = self.scores(backend, 1, self.sampling)
            row = {"accuracy": sum(scores) / len(self.problems),
                   "format": sum(map(has_final_answer_format, texts)) / len(self.problems)}
            if self.samples:
                scores, _ = self.scores(backend, self.samples, self.sampled)
                groups = [scores[i:i + self.samples] for i in range(0, len(scores), self.samples)]
                row["k"] = self.samples
                row["pass@k"] = sum(pass_at_k(self.samples, sum(g), self.samples) for g in groups) / len(groups)
                row["sample_accuracy"] = sum(scores) / len(scores)
        finally:
            model.train(was_training)
        return row

    def scores(self, backend: Backend, n: int, sampling: Sampling) -> tuple[list[float], list[str]]:
        """(0/1 per answer, the answers), n answers per problem (problem-major)."""
        rollouts = backend.generate(self.prompt_ids, n, sampling, tool=getattr(self.trainer, "tool", None))
        texts = self.trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        return self.accuracy(completions=texts, answer=[p.answer for p in self.problems for _ in range(n)]), texts
