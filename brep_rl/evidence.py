"""The learning-evidence matrix: train every variant, pick each one's checkpoint on a validation split, then report
the picks on the held-out test split and on a transfer task, paired against the base, with a strength sweep.

Each training stage runs as its own process, the very command a user would run (scripts/sft.py, scripts/grpo.py,
python -m brep_rl.lora), so memory does not pile up and any stage can be rerun alone. A re-run resumes: finished
stages are skipped, interrupted ones continue from their last checkpoint, evaluated samples are kept.
Writes output_dir/results.json, results.md, evidence.png and each variant's curves.png.
Run: python scripts/evidence.py --config configs/evidence/smollm2_chain_sum.yaml
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from brep_rl.arguments import EvalSettings
from brep_rl.checkpoints import checkpoint_step, checkpoints, last_checkpoint, read_step_log
from brep_rl.errors import UserError
from brep_rl.evaluate import BASE, evaluate, read_records
from brep_rl.files import write_json
from brep_rl.metrics import accuracy_interval, paired_difference
from brep_rl.model import load_base
from brep_rl.plots import plot_matrix, plot_run
from brep_rl.rollout import TransformersBackend
from brep_rl.steering import CONFIG_NAME, WEIGHTS_NAME
from brep_rl.validation import VALIDATION

# each stage is the user's own command, run from the installed package (no checkout needed)
TRAINERS = {name: ["-m", "brep_rl.cli", name] for name in ("sft", "grpo", "lora")}
EVAL_SETS = ("validation", "test", "transfer")
TIES = ("later", "earlier")  # which checkpoint a validation tie goes to


class PlanError(UserError, ValueError):
    """The matrix config cannot be run; the message names the file and field."""


@dataclass
class Variant:
    name: str
    trainer: str  # sft | grpo | lora
    config: Path
    args: dict[str, Any] = field(default_factory=dict)
    after: str | None = None  # start from that variant's picked checkpoint (e.g. SFT -> GRPO)

    @property
    def steering(self) -> bool:
        return self.trainer != "lora"


@dataclass
class Plan:
    model: str
    output_dir: Path
    threads: int
    evals: dict[str, EvalSettings]  # validation, test, transfer
    scales: list[float]
    variants: list[Variant]
    ties: str = "later"


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read the matrix config ({e})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
    missing = [k for k in ("model", "output_dir", "variants", *EVAL_SETS) if k not in raw]
    if missing:
        raise PlanError(f"{path}: missing field(s) {', '.join(missing)}")
    evals = {}
    for name in EVAL_SETS:
        try:
            evals[name] = EvalSettings(**raw[name])
        except (TypeError, ValueError) as e:
            raise PlanError(f"{path}: field {name!r}: {e}") from None
        if evals[name].samples != 1 or evals[name].temperature != 0:
            raise PlanError(f"{path}: field {name!r}: the matrix compares greedy answers, one per problem (samples 1, "
                            f"temperature 0); got samples {evals[name].samples}, temperature {evals[name].temperature}")
    variants: list[Variant] = []
    for name, spec in raw["variants"].items():
        where = f"{path}: variants.{name}"
        if not isinstance(spec, dict) or spec.get("trainer") not in TRAINERS:
            raise PlanError(f"{where}: expected a mapping with trainer one of {', '.join(TRAINERS)}, got {spec!r}")
        config = Path(spec.get("config", "")).absolute()  # relative to where the matrix is run (the checkout)
        if not config.is_file():
            raise PlanError(f"{where}: config {spec.get('config')!r} not found (relative paths start at {Path.cwd()})")
        after = spec.get("after")
        if after is not None and after not in [v.name for v in variants]:
            raise PlanError(f"{where}: after={after!r} must name a variant listed before it")
        if after is not None and spec["trainer"] == "lora":
            raise PlanError(f"{where}: a LoRA stage cannot start from steering vectors (after={after!r})")
        variants.append(Variant(name, spec["trainer"], config, dict(spec.get("args") or {}), after))
    if not variants:
        raise PlanError(f"{path}: variants: none listed")
    ties = raw.get("ties", "later")
    if ties not in TIES:
        raise PlanError(f"{path}: field 'ties': expected one of {', '.join(TIES)}, got {ties!r}")
    return Plan(raw["model"], Path(raw["output_dir"]), int(raw.get("threads", os.cpu_count() or 1)), evals,
                [float(s) for s in raw.get("scales", [])], variants, ties)


def pick(accuracy: dict[str, float], ties: str = "later") -> str:
    """The label with the best validation accuracy; `accuracy` lists the checkpoints in training order, and a tie
    goes to the later one (more training, same evidence) or the earlier one (less training, as brep-rl's own best/
    folders choose)."""
    labels = list(accuracy)
    return max(labels if ties == "earlier" else labels[::-1], key=accuracy.__getitem__)  # max keeps the first of equals


def finished(run: Path) -> bool:
    """The stage saved its final artifact (steering vectors or a LoRA adapter) at the top of its output_dir."""
    return (run / CONFIG_NAME).is_file() or (run / "adapter_config.json").is_file()


def saved_artifacts(run: Path) -> list[Path]:
    """The run's checkpoints that hold an artifact, oldest first; the run itself when it saved none."""
    return [p for p in checkpoints(run) if finished(p)] or [run]


def train(plan: Plan, variant: Variant, init_from: Path | None) -> float:
    """Runs the variant's training stage (skipped when finished); returns its wall-clock seconds (recorded)."""
    run = plan.output_dir / variant.name
    timing = run / "stage.json"
    if finished(run) and timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    command = [sys.executable, *TRAINERS[variant.trainer], "--config", str(variant.config), "--output_dir", str(run),
               "--model", plan.model, "--threads", str(plan.threads)]
    for key, value in variant.args.items():
        command += [f"--{key}", str(value)]
    if init_from is not None:
        command += ["--init_from", str(init_from)]
    before = 0.0
    if run.is_dir():  # an interrupted stage: continue from its last checkpoint (or start over if it has none)
        command += ["--resume_from_checkpoint", "last"]
        before = seconds_before_resume(run)
    print(f"\n== {variant.name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant.name!r}: training exited with code {result.returncode} (command above); "
                           "re-running the matrix resumes it")
    seconds = before + time.perf_counter() - start
    write_json(timing, {"seconds": seconds, "seconds_before_resume": before, "command": command})
    return seconds


def seconds_before_resume(run: Path) -> float:
    """The wall-clock an interrupted stage had spent up to the checkpoint it resumes from, as its validation log
    recorded it (0 without one), so that a stage run in several sittings reports the time of one uninterrupted run."""
    last = last_checkpoint(run)  # the one `--resume_from_checkpoint last` takes
    if last is None:
        return 0.0
    rows = read_step_log(run / VALIDATION, up_to_step=checkpoint_step(last))
    return max((row["seconds"] for row in rows), default=0.0)


def candidate_dirs(plan: Plan, variant: Variant) -> dict[str, Path]:
    """label -> artifact folder, one per checkpoint; steering ones are copied under candidates/ so that every
    label in the shared eval records is unique ("grpo-step8")."""
    found = {}
    for checkpoint in saved_artifacts(plan.output_dir / variant.name):
        step = checkpoint.name.rsplit("-", 1)[1] if checkpoint.name.startswith("checkpoint-") else "final"
        label = f"{variant.name}-step{step}"
        if variant.steering:
            copy = plan.output_dir / "candidates" / label
            if not copy.is_dir():
                tmp = copy.with_name(copy.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    shutil.copy2(checkpoint / name, tmp / name)
                os.replace(tmp, copy)
            checkpoint = copy
        found[label] = checkpoint
    return found


class Evaluator:
    """Per-problem correctness of the base and of labelled artifacts on each eval set, kept in
    output_dir/eval/<set> (steering: one shared record store, so the base is generated once) and
    output_dir/eval/<set>-<label> (a merged LoRA: its own store, where it is the "base"). The summary.md in a
    store covers the models of its latest call only; results.md is the matrix's table."""

    def __init__(self, plan: Plan):
        self.plan = plan
        torch.set_num_threads(plan.threads)
        self.model, self.tokenizer = load_base(plan.model)
        self.model.eval()

    def correctness(self, eval_set: str, artifacts: dict[str, Path], lora: bool = False, scales: list[float] | None = None) -> dict[str, list[bool]]:
        """label -> per-problem correctness (problem order of the eval set), the base included."""
        settings = self.plan.evals[eval_set]
        folder = self.plan.output_dir / "eval" / eval_set
        results = {}
        if lora:
            from brep_rl.lora import load_merged

            for label, adapter in artifacts.items():
                model, tokenizer = load_merged(self.plan.model, adapter)
                summary = evaluate(model, tokenizer, settings, output=f"{folder}-{label}", backend=TransformersBackend(model, tokenizer))
                results[label] = self._read(Path(f"{folder}-{label}"), BASE, summary)
            artifacts = {}
        summary = evaluate(self.model, self.tokenizer, settings, [str(a) for a in artifacts.values()], scales, output=folder)
        results[BASE] = self._read(folder, BASE, summary)
        for label in summary["models"]:
            if label != BASE:
                results[label] = self._read(folder, label, summary)
        return results

    @staticmethod
    def _read(folder: Path, label: str, summary: dict[str, Any]) -> list[bool]:
        """The label's per-problem correctness, in the order of the summary's problems (greedy: one sample each)."""
        records = {r["problem_id"]: bool(r["correct"]) for r in read_records(folder / "samples.jsonl")
                   if r["model"] == label}
        order = summary["problem_ids"]
        return [records[pid] for pid in order]


def score(base: list[bool], other: list[bool]) -> dict[str, float]:
    accuracy, low, high = accuracy_interval([float(x) for x in other], 1)
    paired = paired_difference([float(x) for x in base], [float(x) for x in other], 1)
    return {"accuracy": accuracy, "low": low, "high": high, "diff": paired["diff"], "diff_low": paired["low"],
            "diff_high": paired["high"], "p": paired["p"], "n": len(other)}


def run_plan(plan: Plan) -> dict[str, Any]:
    """Train, select, report; writes output_dir/results.json and results.md and returns the results."""
    evaluator = Evaluator(plan)
    picked: dict[str, tuple[str, Path]] = {}
    results: dict[str, Any] = {"model": plan.model, "evals": {k: vars(v) for k, v in plan.evals.items()}, "base": {}, "variants": {}}
    for variant in plan.variants:
        init_from = picked[variant.after][1] if variant.after else None
        seconds = train(plan, variant, init_from)
        candidates = candidate_dirs(plan, variant)
        validation = evaluator.correctness("validation", candidates, lora=not variant.steering)
        by_label = {label: score(validation[BASE], validation[label]) for label in candidates}
        best = pick({label: by_label[label]["accuracy"] for label in candidates}, plan.ties)
        picked[variant.name] = (best, candidates[best])
        results["variants"][variant.name] = {
            "trainer": variant.trainer, "config": str(variant.config.relative_to(Path.cwd())) if variant.config.is_relative_to(Path.cwd()) else str(variant.config),
            "args": variant.args, "after": variant.after, "train_seconds": seconds, "validation": by_label, "picked": best,
        }
        results["base"].setdefault("validation", score(validation[BASE], validation[BASE]))
    steering = dict(picked[v.name] for v in plan.variants if v.steering)
    lora = dict(picked[v.name] for v in plan.variants if not v.steering)
    for eval_set in ("test", "transfer"):
        correct = evaluator.correctness(eval_set, steering)
        if lora:
            correct.update({label: values for label, values in evaluator.correctness(eval_set, lora, lora=True).items() if label != BASE})
        results["base"][eval_set] = score(correct[BASE], correct[BASE])
        for variant in plan.variants:
            results["variants"][variant.name][eval_set] = score(correct[BASE], correct[picked[variant.name][0]])
    steering_variants = [v.name for v in plan.variants if v.steering]
    if plan.scales and steering_variants:
        best = max(steering_variants, key=lambda name: results["variants"][name]["validation"][picked[name][0]]["accuracy"])
        label, path = picked[best]
        correct = evaluator.correctness("validation", {label: path}, scales=plan.scales)
        sweep = {"1": results["variants"][best]["validation"][label]}
        sweep.update({name.rsplit("@", 1)[1]: score(correct[BASE], values) for name, values in correct.items() if "@" in name})
        results["strength_sweep"] = {"variant": best, "picked": label, "validation": sweep}
    write_json(plan.output_dir / "results.json", results)
    (plan.output_dir / "results.md").write_text(markdown(results))
    plot_matrix(results, plan.output_dir)
    for variant in plan.variants:
        plot_run(plan.output_dir / variant.name)
    return results


def markdown(results: dict[str, Any]) -> str:
    def acc(s):
        return f"{100 * s['accuracy']:.1f}% ({100 * s['low']:.1f}–{100 * s['high']:.1f})"

    def delta(s):
        return f"{100 * s['diff']:+.1f} ({100 * s['diff_low']:+.1f}, {100 * s['diff_high']:+.1f}), p={s['p']:.2g}"

    test, transfer, base = results["evals"]["test"], results["evals"]["transfer"], results["base"]
    lines = [
        f"| variant | training | time | picked (validation acc.) | {test['task']} {test['split']}, n={base['test']['n']} | Δ vs base (95% CI) "
        f"| {transfer['task']} {transfer['split']}, n={base['transfer']['n']} | Δ vs base (95% CI) |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | – | – | {100 * base['validation']['accuracy']:.1f}% | {acc(base['test'])} | – | {acc(base['transfer'])} | – |",
    ]
    for name, v in results["variants"].items():
        training = v["trainer"] + (f" from {v['after']}" if v["after"] else "") + "".join(f", {k}={x}" for k, x in v["args"].items())
        picked = v["picked"]
        lines.append(
            f"| {name} | {training} | {v['train_seconds'] / 60:.1f} min | {picked} ({100 * v['validation'][picked]['accuracy']:.1f}%) "
            f"| {acc(v['test'])} | {delta(v['test'])} | {acc(v['transfer'])} | {delta(v['transfer'])} |"
        )
    sweep = results.get("strength_sweep")
    if sweep:
        lines += ["", f"Strength sweep of {sweep['picked']} (validation, n={base['validation']['n']}):", "",
                  "| scale | accuracy (95% CI) | Δ vs base (95% CI) |", "|---|---|---|"]
        for scale, s in sorted(sweep["validation"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {scale} | {acc(s)} | {delta(s)} |")
    return "\n".join(lines) + "\n"


def run(config: str | Path) -> dict[str, Any]:
    """`brep-rl evidence --config FILE`: run (or resume) the matrix and print its table."""
    plan = load_plan(config)
    results = run_plan(plan)
    print(f"\n{markdown(results)}\nresults: {plan.output_dir / 'results.json'}, {plan.output_dir / 'results.md'}")
    return results
