"""Validation during training: every N optimizer steps, greedy accuracy of the current vectors on held-out problems,
through the rollout backend; `validation.jsonl` gets (step, accuracy, wall-clock seconds) and the best vectors so
far are saved to `output_dir/best` (the checkpoint a long run should be judged by, chosen without the test split).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from brep_rl.arguments import ValidationArguments
from brep_rl.checkpoints import StepLog
from brep_rl.data import Problem, chat_prompt_ids
from brep_rl.rollout import Backend, Sampling, TransformersBackend
from reward import reward_function

logger = logging.getLogger(__name__)

VALIDATION = "validation.jsonl"
BEST = "best"


class ValidationCallback(TrainerCallback):
    """Runs on the main process only; skipped under ZeRO-3, where generating needs every rank."""

    def __init__(self, trainer, problems: list[Problem], args: ValidationArguments, instruction: str | None,
                 system_prompt: str | None, fallback: str, backend: Backend | None = None):
        self.trainer = trainer
        self.problems = problems
        self.every = args.validation_steps
        self.sampling = Sampling(args.validation_max_new_tokens, temperature=0.0)
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
        accuracy = self.measure()
        best = max((row["accuracy"] for row in self.log.rows.values()), default=-1.0)
        seconds = self.elapsed_before + time.perf_counter() - self.started
        self.log.record(state.global_step, {"accuracy": accuracy, "n": len(self.problems), "seconds": round(seconds, 1)})
        line = f"validation at step {state.global_step}: {accuracy:.1%} of {len(self.problems)} (greedy)"
        if accuracy > best:
            steer = self.trainer.steer
            steer.config.provenance.update({**self.trainer.provenance(), "validation_accuracy": accuracy})
            steer.save_pretrained(Path(args.output_dir) / BEST)
            line += f", best so far: saved to {Path(args.output_dir) / BEST}"
        print(line, flush=True)

    def measure(self) -> float:
        backend = self.backend or TransformersBackend(self.trainer.accelerator.unwrap_model(self.trainer.model),
                                                      self.trainer.processing_class)
        backend.sync(self.trainer.steer)  # the vectors as they are after this step
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            rollouts = backend.generate(self.prompt_ids, 1, self.sampling)
        finally:
            model.train(was_training)
        texts = self.trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        scores = self.accuracy(completions=texts, answer=[p.answer for p in self.problems])
        return sum(scores) / len(scores)
