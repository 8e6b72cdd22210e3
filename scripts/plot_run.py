"""Training curves of a run folder as a PNG: reward, accuracy, sampler/trainer gap or KL, and per-layer norms.

    python scripts/plot_run.py runs/demo            # writes runs/demo/curves.png
    python scripts/plot_run.py runs/demo/checkpoint-8
Reads trainer_state.json (the log history: written at the end of training, and in every checkpoint) and
norms.jsonl (per-layer norms, in the run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot_run(run: Path) -> Path:
    state_file = run / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no log history (written when training finishes)")
    history = json.loads(state_file.read_text())["log_history"]
    norms_file = next((f for f in (run / "norms.jsonl", run.parent / "norms.jsonl") if f.is_file()), None)
    last_step = max((h["step"] for h in history), default=0)  # a checkpoint: its run's norms up to its step
    norms = [n for n in map(json.loads, norms_file.read_text().splitlines()) if n["step"] <= last_step] if norms_file else []
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "reward / loss per step", ("reward", "rewards/accuracy_reward/mean", "loss")),
        (axes[0, 1], "groups without signal, truncated completions", ("frac_reward_zero_std", "completions/clipped_ratio")),
        (axes[1, 0], "KL to base, sampler vs trainer, entropy",
         ("kl", "rollout/logp_diff_mean", "rollout/kl_sampler_trainer", "entropy")),
    ]
    for ax, title, keys in panels:
        for key in keys:
            steps, values = series(history, key)
            if steps:
                ax.plot(steps, values, label=key, marker=".")
        ax.set_title(title)
        ax.legend()
    ax = axes[1, 1]
    if norms:
        name = "bias" if "bias" in norms[0] else next(k for k in norms[0] if k != "step")
        image = ax.imshow([[n[name][layer] for n in norms] for layer in range(len(norms[0][name]))], aspect="auto",
                          origin="lower", extent=(norms[0]["step"] - 0.5, norms[-1]["step"] + 0.5, -0.5, len(norms[0][name]) - 0.5))
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("step")
        ax.set_ylabel("steered layer (row)")
        ax.set_title(f"{name} norm per layer")
    fig.suptitle(str(run))
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training output folder or one of its checkpoints")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run))
    except FileNotFoundError as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
