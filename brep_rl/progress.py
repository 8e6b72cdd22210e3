"""What a person reads while training: a progress bar carrying the few figures that matter, and one short line per
logging interval. Every metric still goes to trainer_state.json and to the trackers of `--report_to`
(tensorboard, trackio), where the full set belongs."""

from __future__ import annotations

from transformers import PrinterCallback, ProgressCallback, Trainer

# (label, logged key, format): the figures that say whether training is working
HEADLINE = (
    ("loss", "loss", "{:.4f}"),
    ("reward", "reward", "{:.3f}"),
    ("accuracy", "rewards/accuracy_reward/mean", "{:.0%}"),
    ("no signal", "frac_reward_zero_std", "{:.0%}"),
    ("no signal drawn", "dynamic/zero_variance_before", "{:.0%}"),
    ("s/step", "step_time", "{:.1f}"),
    ("held-out loss", "eval_loss", "{:.4f}"),
    ("runtime", "train_runtime", "{:.0f}s"),
)


def headline(logs: dict[str, float]) -> dict[str, str]:
    return {label: fmt.format(logs[key]) for label, key, fmt in HEADLINE if isinstance(logs.get(key), (int, float))}


class ReadableProgress(ProgressCallback):
    """The bar (unless --disable_tqdm) with the headline figures as its postfix, and one line per log."""

    def __init__(self, bar: bool = True):
        super().__init__()
        self.bar = bar

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bar:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        figures = headline(logs or {})
        if not state.is_world_process_zero or not figures:
            return
        line = f"step {state.global_step}/{state.max_steps}  " + "  ".join(f"{k} {v}" for k, v in figures.items())
        if self.training_bar is not None:
            self.training_bar.set_postfix(figures, refresh=False)
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


def use_readable_progress(trainer: Trainer) -> None:
    """Swap the Trainer's raw log printing (a dict of ~30 numbers per step) for ReadableProgress."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ReadableProgress(bar=not trainer.args.disable_tqdm))
