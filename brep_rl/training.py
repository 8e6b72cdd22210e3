"""What SFT and GRPO training share: attaching trainable vectors, machine checks, and a Trainer mixin that
checkpoints the vectors only (KB, not the base), restrains them after every optimizer step, and logs norms."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer import SCHEDULER_NAME, rotate_checkpoints

from brep_rl.arguments import ModelArguments, SteeringArguments, default_threads
from brep_rl.checkpoints import (
    NORMS,
    STAGING,
    TRAINER_STATE,
    StepLog,
    checkpoint_step,
    last_checkpoint,
    prepare_output_dir,
    publish_checkpoint,
    weights_only_loading,
)
from brep_rl.errors import ConfigError
from brep_rl.files import write_json
from brep_rl.model import load_base
from brep_rl.progress import use_readable_progress
from brep_rl.steering import SteeringVectors, read_artifact

logger = logging.getLogger(__name__)

TRAINING_STATE = "brep_state.json"  # in each checkpoint: state of ours an exact resume needs


def set_threads(model_args: ModelArguments) -> None:
    """torch threads for a training process: --threads, else this machine's cores shared among its processes."""
    # Deliberately: `accelerate launch` sets OMP_NUM_THREADS=1, which runs a single process at half speed on 2 cores.
    threads = model_args.threads or default_threads()
    torch.set_num_threads(threads)
    logger.warning("torch threads per process: %d (%s local process(es); set --threads to change)", threads,
                   os.environ.get("LOCAL_WORLD_SIZE", "1"))


def load_for_training(model_args: ModelArguments, steer_args: SteeringArguments, calibration: Callable | None = None):
    """The frozen base with trainable vectors attached: fresh from `steer_args`, or loaded from `init_from`.

    `calibration(tokenizer) -> (input_ids, attention_mask)`: a batch to measure site norms on, for a relative radius.
    """
    set_threads(model_args)
    model, tokenizer = load_base(model_args.model, dtype=model_args.dtype)
    if steer_args.init_from:
        load = SteeringVectors.from_gguf if steer_args.init_from.endswith(".gguf") else SteeringVectors.from_pretrained
        steer = load(steer_args.init_from, model)
        # keep the restraint asked for now; the artifact's own is its training history
        steer.config.radius, steer.config.radius_relative, steer.config.penalty = steer_args.radius, steer_args.radius_relative, steer_args.penalty
        steer.config.provenance = {"init_from": steer_args.init_from, "previous": steer.config.provenance}
    else:
        steer = SteeringVectors.attach(model, steer_args.to_config(model.config.num_hidden_layers))
    if steer.config.radius_relative and steer.config.site_norms is None:
        if calibration is None:
            raise ConfigError("radius_relative needs calibration data to measure the site norms")
        steer.calibrate(*calibration(tokenizer))
    steer.project()
    return model, tokenizer, steer


def launched_as_main() -> bool:
    """Rank 0 of the launch (or the only process), known before a Trainer and its accelerator exist."""
    return int(os.environ.get("RANK", "0")) == 0


def claim_output_dir(args) -> None:
    """Before any work: refuse an output_dir holding a previous run unless resuming or overwriting it."""
    prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir, is_main=launched_as_main())


def add_validation(trainer, val_args, data_args, model_args, seed: int) -> None:
    """Validate every `val_args.validation_steps` steps (brep_rl/validation.py), with the trainer's rollout backend
    or, for SFT, one made for the job (llama.cpp where it applies: ~3x faster than generate; for a LoRA, generate).
    Nothing when validation is off (no `val_args`, or 0 steps)."""
    from brep_rl.rollout import TransformersBackend, make_backend
    from brep_rl.validation import ValidationCallback

    if val_args is None or not val_args.validation_steps:
        return
    if zero3_enabled(trainer):
        logger.warning("no validation during training under ZeRO-3 (generation needs every rank)")
        return
    backend = getattr(trainer, "backend", None)
    steer = getattr(trainer, "steer", None)
    if backend is None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        backend = (make_backend("auto", model, trainer.processing_class, model_args.model, [steer.config], torch.get_num_threads())
                   if steer is not None else TransformersBackend(model, trainer.processing_class))  # a LoRA: the live adapter
    trainer.add_callback(ValidationCallback(
        trainer, val_args.problems(data_args, seed), val_args, data_args.instruction, data_args.system_prompt,
        getattr(data_args, "fallback", "last_number"), backend,
    ))


def quiet_dependency_warnings() -> None:
    """transformers/TRL deprecation notices about names they use internally would bury the progress bar."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl)\.")


def check_machine(args) -> None:
    """Refuse, before any work, a launch this machine cannot run."""
    if args.deepspeed and isinstance(args.deepspeed, str) and not Path(args.deepspeed).is_file():
        raise ConfigError(f"--deepspeed: config {args.deepspeed} not found (see configs/deepspeed/)")
    if torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = os.cpu_count() or 1
    if local > cores:
        raise ConfigError(f"{local} processes on this machine but only {cores} CPU cores and no GPU: launch at most {cores}")
    if args.fp16:
        raise ConfigError("--fp16: fp16 training needs a GPU; on a CPU train in fp32 (the default) or bf16")


def several_processes() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def destroy_process_group() -> None:
    """An exit handler: release the process group while the interpreter is still alive (pytorch PR 179291). DDP still
    holds the group after it, so a rank that must not reach the interpreter's teardown also calls exit_rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a rank of a multi-process run whose work is done: Python's exit handlers run (destroy_process_group among
    them), the interpreter's teardown does not. DDP keeps the process group alive past destroy_process_group, and in
    the teardown a C++ worker thread that reaches for the GIL is ended with pthread_exit, which aborts the rank now and
    then (SIGABRT, "terminate called without an active exception") after it finished. A single process just returns."""
    if not several_processes():
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_cpu_distributed(args) -> None:
    """Make multi-process training on a machine without a GPU work as it does with one. Call before
    TrainingArguments.__post_init__.

    Plain DDP: train on the CPU explicitly (use_cpu), or transformers sees no distributed setup and every process
    trains alone. DeepSpeed: use_cpu would bypass DeepSpeed altogether, and without it transformers passes
    accelerate no backend, so accelerate counts one process and sizes DeepSpeed's batch for a world of 1. So we
    set up accelerate's state ourselves (DeepSpeed over gloo) and have the arguments adopt it.
    """
    if torch.cuda.is_available():
        return
    if several_processes():
        atexit.unregister(destroy_process_group)  # once, however often the arguments are parsed
        atexit.register(destroy_process_group)
    if not getattr(args, "deepspeed", None):
        args.use_cpu = True
        return
    if several_processes():
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        config = args.accelerator_config
        if config is None or isinstance(config, dict):
            args.accelerator_config = {**(config or {}), "use_configured_state": True}


class RestraintCallback(TrainerCallback):
    """Projects the vectors back into their ball after every optimizer step (each rank alike, so they stay equal)."""

    def __init__(self, steer: SteeringVectors):
        self.steer = steer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steer.project()


class RunStart(TrainerCallback):
    """Once the Trainer knows where it starts (step 0, or a resumed step): the norms log forgets the steps it redoes,
    and the machine's speed is measured for the artifact's provenance."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            self.trainer.norms_log.start(state.global_step)
            self.trainer.matmul_gflops = matmul_gflops()


def matmul_gflops(size: int = 512, seconds: float = 0.3) -> float:
    """fp32 matmul throughput at the current torch threads. This shared machine ran the same code 2x faster on some
    days than on others: a run's wall-clock is read beside the speed it ran at."""
    a = torch.ones(size, size)  # no random numbers: the run's seeded streams stay untouched
    a @ a  # warm-up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ a
        calls += 1
    return round(2 * size**3 * calls / elapsed / 1e9, 1)


def zero3_enabled(trainer) -> bool:
    """Parameters partitioned across ranks: generation (e.g. a final eval) needs every rank, not just the first."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def train_and_save(trainer) -> Path:
    """Train (resuming from args.resume_from_checkpoint: a checkpoint, or "last" for the newest in output_dir),
    then save the artifact to output_dir."""
    resume = trainer.args.resume_from_checkpoint
    output = Path(trainer.args.output_dir)
    if resume == "last":
        resume = last_checkpoint(output)
        if resume is None:
            logger.warning("resume_from_checkpoint=last: no checkpoint in %s, starting fresh", output)
        else:
            resume = str(resume)
    if resume is None:
        trainer.train()
    elif 0 < trainer.args.max_steps <= checkpoint_step(resume):
        # the run had finished (a re-run after a kill between its last checkpoint and what follows): the Trainer
        # would train one step past max_steps, so take the checkpoint as it is
        print(f"{resume} is at max_steps ({trainer.args.max_steps}): nothing left to train", flush=True)
        with weights_only_loading(resume):
            trainer._load_from_checkpoint(resume)
        # the run's state beside its artifact, when saved at that step, has the whole log history
        saved = (output / TRAINER_STATE).is_file() and checkpoint_step(output) == checkpoint_step(resume)
        trainer.state = TrainerState.load_from_json(str((output if saved else Path(resume)) / TRAINER_STATE))
    else:
        with weights_only_loading(resume):
            trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if trainer.is_world_process_zero():  # the whole log history beside the artifact, for scripts/plot_run.py
        trainer.state.save_to_json(str(output / TRAINER_STATE))
    return output


def final_eval(trainer, tokenizer, settings, backend=None) -> None:
    """Base vs the saved artifact through the harness (main process), as a user would run it; records in output_dir/eval.
    `backend`: the rollout backend training used (default: one made from `settings.backend`)."""
    from brep_rl.evaluate import evaluate, markdown_table

    output = Path(trainer.args.output_dir)
    if zero3_enabled(trainer):
        print(f"(no final eval under ZeRO-3, where generation needs every rank: run `brep-rl eval --steering {output}`)")
        return
    shutil.rmtree(output / "eval", ignore_errors=True)  # a new artifact: records of an earlier run do not apply
    trainer.steer.detach()  # the harness loads the saved artifact itself
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    summary = evaluate(model, tokenizer, settings, [str(output)], output=output / "eval", backend=backend)
    print(f"\nbase vs steered on {settings.limit} {settings.task} ({settings.split}) problems, "
          + ("greedy:" if settings.temperature == 0 else f"temperature {settings.temperature}:"))
    print(markdown_table(summary))


class SteeringTrainerMixin:
    """For a transformers Trainer (or a TRL trainer) whose model carries SteeringVectors.

    - save_model writes the steering artifact (steering.safetensors + steering_config.json), never the base;
    - resuming from a checkpoint loads the vectors from it;
    - logs carry the vectors' norms, and every log line's per-layer norms go to norms.jsonl in output_dir.
    """

    steer: SteeringVectors

    def setup_steering(self, steer: SteeringVectors) -> None:
        """Call at the end of the subclass's __init__: check the arguments, restrain after every optimizer step,
        print readable progress."""
        if getattr(self.args, "activation_checkpointing", False) or getattr(self.args, "gradient_checkpointing", False):
            raise ConfigError(
                "gradient (activation) checkpointing is not supported with steering vectors: it re-runs layer forwards during the "
                "backward pass, outside the steering window, which would silently give wrong gradients"
            )
        self.steer = steer
        self.norms_log = StepLog(Path(self.args.output_dir) / NORMS)
        self.matmul_gflops: float | None = None  # the machine's speed at the last (re)start, measured by RunStart
        self.add_callback(RestraintCallback(steer))
        self.add_callback(RunStart(self))
        use_readable_progress(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        tensors = self.steer.state_tensors()  # on every rank: under ZeRO-3 gathering the vectors is collective
        if self.args.should_save:
            self.steer.config.provenance.update(self.provenance())
            self.steer.save_pretrained(output_dir, tensors)

    def provenance(self) -> dict:
        return {"trainer": type(self).__name__, "global_step": self.state.global_step, "seed": self.args.seed,
                "learning_rate": self.args.learning_rate,
                **({"matmul_gflops": self.matmul_gflops} if self.matmul_gflops else {})}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint would otherwise hold the whole frozen base
            from accelerate.utils import DeepSpeedSchedulerWrapper  # exists only where deepspeed is installed

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)  # not in the engine's
            return
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written whole into a staging folder by every rank, then renamed into place by the
        main process: a kill at any moment leaves either the complete checkpoint-N or none."""
        run = Path(self._get_output_dir(trial=trial))
        self._get_output_dir = lambda trial=None: str(run / STAGING)  # where the Trainer writes this once
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = run / STAGING / f"checkpoint-{self.state.global_step}"
            write_json(staged / TRAINING_STATE, self.extra_state())
            publish_checkpoint(staged, run)
            rotate_checkpoints(output_dir=str(run), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The first moment a DeepSpeed engine exists, just before the Trainer resumes it: have it resume ours.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None and not hasattr(wrapped.engine, "load_full_checkpoint"):
            self._resume_vectors_only(wrapped.engine)
        return scheduler

    def _resume_vectors_only(self, engine) -> None:
        """The engine's checkpoint holds what trains, not the frozen base (exclude_frozen_parameters), so the
        Trainer's strict load of it would fail: load it non-strictly, then our own state (the Trainer calls
        _load_from_checkpoint only without DeepSpeed)."""
        engine.load_full_checkpoint = engine.load_checkpoint

        def load_checkpoint(load_dir, *args, **kwargs):
            loaded = engine.load_full_checkpoint(load_dir, *args, **{**kwargs, "load_module_strict": False})
            self.resumed(load_dir)
            return loaded

        engine.load_checkpoint = load_checkpoint

    def extra_state(self) -> dict:
        """What a checkpoint must hold besides the Trainer's own state for an exact resume (e.g. a curriculum)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        _, tensors = read_artifact(resume_from_checkpoint)
        self.steer.load_tensors(tensors, source=resume_from_checkpoint)
        self.resumed(resume_from_checkpoint)

    def resumed(self, checkpoint: str) -> None:
        """The vectors are back (from our artifact, or from DeepSpeed's engine): restore the rest of our state."""
        state_file = Path(checkpoint) / TRAINING_STATE
        if state_file.is_file():
            self.load_extra_state(json.loads(state_file.read_text()))
        logger.info("resumed steering vectors from %s", checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            self._load_from_checkpoint(self.state.best_model_checkpoint)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        norms = self.steer.norms()  # every rank logs, so a ZeRO-3 gather here is collective as it must be
        for name, values in norms.items():
            logs[f"{name}_norm_mean"] = round(float(values.mean()), 4)
            logs[f"{name}_norm_max"] = round(float(values.max()), 4)
        if self.args.should_save and self.state.global_step > 0:
            self.norms_log.record(self.state.global_step, {k: [round(x, 5) for x in v.tolist()] for k, v in norms.items()})
        super().log(logs, *args, **kwargs)
