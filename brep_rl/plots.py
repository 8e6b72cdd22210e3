"""Plots: a run's training curves (reward, sampler/trainer gap or KL, per-layer norms) and the evidence matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib (the `bench` extra) is imported when a plot is drawn, not when brep_rl is: headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "reward / loss per step", ("reward", "rewards/accuracy_reward/mean", "loss")),
        (axes[0, 1], "groups without signal, truncated completions",
         ("frac_reward_zero_std", "dynamic/zero_variance_before", "completions/clipped_ratio")),
        (axes[1, 0], "KL to base, sampler vs trainer, entropy",
         ("kl", "rollout/logp_diff_mean", "rollout/kl_sampler_trainer", "entropy")),
    ]
    for ax, title, keys in panels:
        for key in keys:
            steps, values = series(history, key)
            if steps:
                ax.plot(steps, values, label=key, marker=".")
        ax.set_title(title)
        if ax.lines:
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
    plt.close(fig)
    return out


def plot_matrix(results: dict[str, Any], output_dir: Path) -> Path:
    """The evidence matrix at a glance: held-out and transfer accuracy of every variant (95% intervals) against the
    base, and the training curves of every variant (reward per GRPO step, loss per SFT step)."""
    names = ["base", *results["variants"]]
    rows = [results["base"], *results["variants"].values()]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, eval_set in zip(axes[:2], ("test", "transfer")):
        settings = results["evals"][eval_set]
        values = [100 * r[eval_set]["accuracy"] for r in rows]
        # clipped at 0: a Wilson bound of 0% or 100% can sit a rounding error past the estimate
        errors = [[max(0.0, v - 100 * r[eval_set]["low"]) for v, r in zip(values, rows)],
                  [max(0.0, 100 * r[eval_set]["high"] - v) for v, r in zip(values, rows)]]
        ax.bar(names, values, yerr=errors, capsize=3, color=["grey"] + ["C0"] * (len(names) - 1))
        ax.axhline(values[0], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{settings['task']} {settings['split']} (n={rows[0][eval_set]['n']}), greedy")
        ax.set_ylabel("accuracy %")
        ax.tick_params(axis="x", rotation=30)
    ax = axes[2]
    for name in results["variants"]:
        state = output_dir / name / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text())["log_history"]
            key = "reward" if any("reward" in h for h in history) else "loss"
            steps, values = series(history, key)
            ax.plot(steps, values, marker=".", label=f"{name} ({key})")
    ax.set_title("training: sampled reward (GRPO) or loss (SFT) per step")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = output_dir / "evidence.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def validation_curve(run: Path, after: tuple[int, float] = (0, 0.0)) -> tuple[list[int], list[float], list[float]]:
    """(optimizer steps, wall-clock minutes, greedy accuracy %) of a run's validation.jsonl, shifted by `after`, the
    (steps, seconds) of the stage the run started from, so that SFT -> GRPO is drawn from the start of its SFT."""
    path = run / "validation.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no validation log (train with --validation_steps N)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps, seconds = after
    return ([steps + r["step"] for r in rows], [(seconds + r["seconds"]) / 60 for r in rows],
            [100 * r["accuracy"] for r in rows])


def plot_validation(runs: dict[str, Path], out: Path, after: dict[str, tuple[int, float]] | None = None) -> Path:
    """Validation accuracy of several runs against optimizer steps and against wall-clock minutes, on one figure: e.g.
    SFT-only and SFT -> GRPO, the second shifted by its SFT stage (`after`: label -> (steps, seconds))."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, run in runs.items():
        steps, minutes, accuracy = validation_curve(run, (after or {}).get(label, (0, 0.0)))
        by_step.plot(steps, accuracy, marker=".", label=label)
        by_time.plot(minutes, accuracy, marker=".", label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock minutes (2 CPU cores)")
    for ax in (by_step, by_time):
        ax.set_ylabel("validation accuracy (%), greedy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_artifact(directory: str | Path, out: str | Path, compare: str | Path | None = None) -> Path:
    """Per-layer norms of an artifact's vectors and the cosine similarity between its layers' vectors (with
    `compare`: between its layers and the other artifact's)."""
    from brep_rl.analysis import layer_cosines
    from brep_rl.steering import read_artifact

    config, tensors = read_artifact(directory)
    name = "bias" if "bias" in tensors else next(iter(tensors))
    other = read_artifact(compare)[1].get(name) if compare else None
    plt = _pyplot()
    fig, (norms, cosines) = plt.subplots(1, 2, figsize=(12, 4.5))
    for vector_name, t in tensors.items():
        norms.plot(config.layers, t.float().norm(dim=-1).tolist(), marker=".", label=f"{vector_name} ({Path(directory).name})")
    if other is not None:
        norms.plot(config.layers, other.float().norm(dim=-1).tolist(), marker=".", label=f"{name} ({Path(compare).name})")
    norms.set_xlabel("layer")
    norms.set_ylabel("L2 norm")
    norms.legend()
    image = cosines.imshow(layer_cosines(tensors[name], other).numpy(), vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
    fig.colorbar(image, ax=cosines)
    cosines.set_title(f"cosine between layers' {name} vectors" + (f" vs {Path(compare).name}" if other is not None else ""))
    cosines.set_xlabel("row (steered layer)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
