"""`python kill_at.py MOMENT STEP VERB [flags]`: run `brep-rl VERB` and SIGKILL it at a chosen moment, as a crash,
an OOM killer or a pre-empted job would: `after_step` (step STEP done, its checkpoint maybe not) or `saving` (the
checkpoint of STEP fully written in the staging folder, not yet renamed into place)."""

import os
import signal
import sys

from transformers import TrainerCallback

from brep_rl import training
from brep_rl.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


if __name__ == "__main__":
    moment, step, verb, *argv = sys.argv[1:]
    step = int(step)
    if moment == "after_step":
        setup = training.SteeringTrainerMixin.setup_steering

        def setup_then_arm(self, steer):
            setup(self, steer)
            self.add_callback(KillAfterStep(step))

        training.SteeringTrainerMixin.setup_steering = setup_then_arm
    elif moment == "saving":
        publish = training.publish_checkpoint

        def publish_or_die(staged, run):
            if staged.name == f"checkpoint-{step}":
                die()
            return publish(staged, run)

        training.publish_checkpoint = publish_or_die
    else:
        raise SystemExit(f"unknown moment {moment!r}")
    sys.exit(main([verb, *argv]))
