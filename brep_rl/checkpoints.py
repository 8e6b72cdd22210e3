"""A run folder: which checkpoint to resume, whether the folder may be written, and the per-step norms log.

A checkpoint is written into a staging folder, synced to disk and renamed into place (trainers call
`publish_checkpoint`), so `checkpoint-N` is either whole or absent; `last_checkpoint` still checks that each one
reads back and falls back to the one before, naming what it skipped.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.files import to_json, write_jsonl
from brep_rl.steering import CONFIG_NAME, WEIGHTS_NAME, read_artifact

logger = logging.getLogger(__name__)

STAGING = ".staging"  # where a checkpoint is written before it is renamed into place
NORMS = "norms.jsonl"
TRAINER_STATE = "trainer_state.json"
SELF_SOLUTIONS = "self_solutions.json"  # SFT --solutions self: the correct samples drawn, for a resume
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run: str | Path) -> list[Path]:
    """The checkpoint-N folders of a run, oldest first."""
    found = [p for p in Path(run).iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if Path(run).is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it can): its trainer state and vectors must read back."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} unreadable ({type(e).__name__})"
    if (checkpoint / "adapter_config.json").is_file():  # a LoRA reference run: PEFT's adapter, not vectors
        return None
    try:
        read_artifact(checkpoint)
    except ArtifactError as e:
        return str(e)
    return None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"]


def last_checkpoint(run: str | Path) -> Path | None:
    """The newest checkpoint that reads back; incomplete or corrupt ones are skipped with a warning naming them."""
    for checkpoint in reversed(checkpoints(run)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("skipping checkpoint %s: %s; trying the one before", checkpoint, problem)
    return None


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fsync(path)


def publish_checkpoint(staged: Path, run: Path) -> Path:
    """Move a fully written checkpoint from the staging folder to `run/<its name>`: synced first, then renamed."""
    final = run / staged.name
    fsync_tree(staged)
    if final.exists():  # a checkpoint of the same step from a run resumed before it: replaced whole
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync(run)  # the rename itself
    return final


def previous_run(run: Path) -> list[str]:
    """What a training run left in `run`: checkpoints, an artifact, logs."""
    if not run.is_dir():
        return []
    names = [p.name for p in checkpoints(run)]
    return names + [n for n in (WEIGHTS_NAME, CONFIG_NAME, NORMS, TRAINER_STATE, SELF_SOLUTIONS) if (run / n).exists()]


def prepare_output_dir(output_dir: str, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Refuse to write over a previous run unless told how: resume it, or overwrite it (its files are removed)."""
    run = Path(output_dir)
    found = previous_run(run)
    if not found or resume:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"--output_dir {run} holds a previous run ({shown}): pass --resume_from_checkpoint last to "
                          "continue it, --overwrite_output_dir to replace it, or choose another --output_dir")
    if is_main:
        logger.warning("--overwrite_output_dir: removing the previous run in %s", run)
        for name in [*found, STAGING, "eval", "runs", "validation.jsonl", "best"]:
            path = run / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def deepspeed_state_types() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers (none when DeepSpeed is not
    in use: a run that uses it has imported it by the time it resumes)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading(checkpoint: str) -> Iterator[None]:
    """Resume without running code from a checkpoint: DeepSpeed reads its own state with
    torch.load(weights_only=False), which unpickles anything. Within this block every torch.load is weights_only
    (tensors, containers and the DeepSpeed classes above), and a file that holds more is refused, named."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            yield
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        detail = next((line.strip() for line in lines if "GLOBAL" in line), lines[0] if lines else "")  # the class
        raise ArtifactError(f"--resume_from_checkpoint {checkpoint}: a file there holds more than tensors and "
                            f"settings, refused (it could run code when read): {detail}") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def read_step_log(path: str | Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a StepLog file (none if it is missing), those of steps <= up_to_step when given."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if up_to_step is None or row.get("step", 0) <= up_to_step:
                rows.append(row)
    return rows


class StepLog:
    """A JSONL file with one row per training step (per-layer norms, validation accuracy): each step once, also
    across a resume, which redoes the steps after its checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[int, dict] = {}

    def start(self, global_step: int) -> None:
        """At the start of training (global_step > 0 after a resume): drop the rows past it."""
        kept = read_step_log(self.path, global_step)
        self.rows = {row["step"]: row for row in kept}
        if self.path.exists():
            write_jsonl(self.path, kept)

    def record(self, step: int, values: dict) -> None:
        if step < 0 or step in self.rows:  # end-of-training and evaluation logs repeat the step
            return
        self.rows[step] = {"step": step, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(to_json(self.rows[step]) + "\n")
