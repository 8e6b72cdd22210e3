"""A 2-process GRPO run (same flags as scripts/grpo.py) whose rank 1 dies with SIGKILL after step 1, as an OOM kill
would: the job must end with an error, not wait forever for the dead rank."""

import os
import signal
import sys
import time

from transformers import TrainerCallback

from brep_rl import training
from brep_rl.cli import main


class KillRankAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and os.environ.get("RANK") == "1":
            with open(os.path.join(args.output_dir, "killed_at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    setup = training.SteeringTrainerMixin.setup_steering

    def setup_then_arm(self, steer):
        setup(self, steer)
        self.add_callback(KillRankAfterStep())

    training.SteeringTrainerMixin.setup_steering = setup_then_arm
    sys.exit(main(["grpo", *sys.argv[1:]]))
