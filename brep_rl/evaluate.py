"""Evaluation harness: the base and steered models on the same problems in one run, scored with reward/.

Per-sample records go to `samples.jsonl` as they are produced (a re-run skips what is there: resumable);
the summary goes to `summary.json` and `summary.md`. The base is the same model object with steering
disabled, never a second load. LoRA adapters (the reference) are evaluated one at a time after them: on llama.cpp
as llama.cpp LoRA adapters where the base and steered models run there, else put on that model and taken off again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from brep_rl.arguments import EvalSettings, parse_layers
from brep_rl.data import Problem, chat_prompt, chat_prompt_ids, load_task
from brep_rl.errors import ConfigError
from brep_rl.files import to_json, write_json, write_jsonl
from brep_rl.lora_gguf import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora_gguf, is_peft_adapter
from brep_rl.metrics import accuracy_interval, majority_vote, paired_difference, pass_at_k
from brep_rl.rollout import (
    Backend,
    Calculator,
    Rollouts,
    Sampling,
    TransformersBackend,
    generate_each,
    hash_seed,
    make_backend,
)
from brep_rl.steering import CONFIG_NAME, WEIGHTS_NAME, SteeringVectors, read_artifact
from reward import default_verifier, extract_answer, has_final_answer_format

logger = logging.getLogger(__name__)

BASE = "base"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


@dataclass
class Variant:
    label: str
    artifact: str | None = None
    scale: float = 1.0
    layers: list[int] | None = None  # None: all of the artifact's layers


def read_records(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    """The records of a samples.jsonl (its `text` when already read), in order. A line cut short by a kill is dropped
    with a warning: a resumed eval generates its sample again."""
    records = []
    for number, line in enumerate((path.read_text() if text is None else text).splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: incomplete record dropped", path, number)
    return records


class RecordStore:
    """samples.jsonl: one JSON line per (model, problem, sample); read back on resume."""

    def __init__(self, output: Path | None, settings: EvalSettings):
        self.path = output / "samples.jsonl" if output else None
        self.run_file = output / "run.json" if output else None
        self.records: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.run: dict[str, Any] = {k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"}
        self.run["artifacts"] = {}
        if output is None:
            return
        output.mkdir(parents=True, exist_ok=True)
        if self.run_file.is_file():
            # a setting added after the run was written is taken at its default (what that run did)
            defaults = {f.name: f.default for f in dataclasses.fields(settings)}
            previous = defaults | json.loads(self.run_file.read_text())
            changed = {k: (previous.get(k), v) for k, v in self.run.items() if k != "artifacts" and previous.get(k) != v}
            if changed:
                details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(f"{output} holds an evaluation with other settings ({details}); use another --output or delete it")
            self.run["artifacts"] = previous.get("artifacts", {})
        write_json(self.run_file, self.run)
        if self.path.is_file():
            text = self.path.read_text()
            records = read_records(self.path, text)
            self.records = {(r["model"], r["problem_id"], r["sample"]): r for r in records}
            if len(records) < len(text.splitlines()) or (text and not text.endswith("\n")):
                # rewrite without the broken line, so new records are not appended onto it
                write_jsonl(self.path, self.records.values())

    def check_artifact(self, label: str, artifact: str | None) -> None:
        """Records of `label` are reused only for the very artifact that produced them (same file contents)."""
        if artifact is None:
            return
        digest = hashlib.sha256()
        adapter = not (Path(artifact) / CONFIG_NAME).is_file()
        for name in (ADAPTER_FILES if adapter else (WEIGHTS_NAME, CONFIG_NAME)):
            digest.update((Path(artifact) / name).read_bytes())
        fingerprint = digest.hexdigest()
        previous = self.run["artifacts"].get(label)
        if previous not in (None, fingerprint):
            raise ValueError(f"{artifact} changed since {self.path} was written (its records are of another artifact); "
                             "use another --output or delete it")
        self.run["artifacts"][label] = fingerprint
        if self.run_file:
            write_json(self.run_file, self.run)

    def done(self, label: str, problem: Problem, samples: int) -> bool:
        return all((label, problem.id, s) in self.records for s in range(samples))

    def add(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.records[(r["model"], r["problem_id"], r["sample"])] = r
        if self.path:
            with self.path.open("a") as f:
                f.write("".join(to_json(r) + "\n" for r in records))
                f.flush()


def failed_problems(problems: list[Problem], run: Path, label: str | None, task: dict[str, Any]) -> list[Problem]:
    """The `problems` that model `label` of the eval run in folder `run` got wrong in every sample there, in order.

    `label` defaults to the run's only steered model. The run must have read the same task, split and reasoning-gym
    config (`task`), else its problem ids name other problems; problems it did not evaluate are left out."""
    run_file, samples = run / "run.json", run / "samples.jsonl"
    if not run_file.is_file() or not samples.is_file():
        raise ConfigError(f"{run}: not an eval run (expected run.json and samples.jsonl from `brep-rl eval --output`)")
    settings = json.loads(run_file.read_text())
    differs = {k: (settings.get(k), v) for k, v in task.items() if settings.get(k) != v}
    if differs:
        details = "; ".join(f"{k}: run {old!r}, training {new!r}" for k, (old, new) in differs.items())
        raise ConfigError(f"{run} evaluated other problems than the training set ({details})")
    steered = list(settings.get("artifacts", {}))
    if label is None:
        if len(steered) != 1:
            raise ConfigError(f"{run} holds {len(steered)} steered models ({', '.join(steered) or 'none'}): name one")
        label = steered[0]
    right: dict[str, bool] = {}
    for record in read_records(samples):
        if record["model"] == label:
            right[record["problem_id"]] = right.get(record["problem_id"], False) or record["correct"]
    if not right:
        raise ConfigError(f"{run} has no records of model {label!r} (models there: base, {', '.join(steered)})")
    failed = [p for p in problems if right.get(p.id) is False]
    logger.warning("training on the %d of %d problems %s got wrong in %s (%d not evaluated there)", len(failed),
                   len(problems), label, run, sum(p.id not in right for p in problems))
    if not failed:
        raise ConfigError(f"{run}: {label} got every training problem it was evaluated on right: nothing to train on")
    return failed


def labelled_paths(specs: list[str], flag: str = "--steering", taken: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(paths, labels) of `--steering` or `--lora` entries: PATH is labelled by its folder's name (by its path where
    names repeat, as checkpoint-N and best do across runs, or where the name is `taken` or the base's), LABEL=PATH by
    LABEL."""
    taken = {BASE, *taken}
    named = [(None, spec) if Path(spec).exists() or "/" in spec.partition("=")[0] else spec.partition("=")[::2]
             for spec in specs]
    paths = [path for _, path in named]
    names = [Path(path).name for label, path in named if not label]
    labels = [label or (name if names.count(name := Path(path).name) == 1 and name not in taken else path)
              for label, path in named]
    clashes = sorted({label for label in labels if labels.count(label) > 1 or label in taken})
    if clashes:
        raise ConfigError(f"{flag}: label(s) {', '.join(map(repr, clashes))} name more than one model; give each "
                          "one a label of its own as LABEL=PATH")
    return paths, labels


def variant_label(name: str, scale: float, layer_spec: str, scales: list[float], layer_specs: list[str]) -> str:
    """An artifact's row: its label, with the scale and the layer subset where more than the default are compared."""
    label = name if scales == [1.0] else f"{name}@{scale:g}"
    return label if layer_specs == ["all"] else f"{label}[{layer_spec}]"


def variant_contexts(model, artifacts: list[str], labels: list[str], scales: list[float], layer_specs: list[str]):
    """Yields (Variant, steering vectors or None, context) in order: the base, then each artifact with each layer
    subset (distinct `--layers` specs) at each scale, one artifact attached at a time."""
    if not artifacts:
        yield Variant(BASE), None, contextlib.nullcontext()
        return
    for index, (artifact, name) in enumerate(zip(artifacts, labels)):
        steer = SteeringVectors.from_pretrained(artifact, model)
        try:
            if index == 0:
                yield Variant(BASE), steer, steer.disabled()
            for spec in layer_specs:
                layers = parse_layers(spec, steer.config.num_hidden_layers)
                missing = sorted(set(layers or []) - set(steer.layer_ids))
                if missing:
                    raise ConfigError(f"--layers {spec}: {artifact} does not steer layers {missing} "
                                      f"(it steers {steer.layer_ids})")
                for scale in scales:
                    label = variant_label(name, scale, spec, scales, layer_specs)
                    yield Variant(label, artifact, scale, layers), steer, _steered(steer, layers, scale)
        finally:
            steer.detach()


def lora_variants(model, tokenizer, adapters: list[str], labels: list[str], backend: Backend):
    """Yields (Variant, the backend that generates with it) for each PEFT LoRA adapter in turn: a llama.cpp `backend`
    with the adapter exported as a llama.cpp LoRA, otherwise transformers with the adapter put on the model (the plain
    model is restored after each)."""
    from peft import PeftModel

    for adapter, label in zip(adapters, labels):
        if backend.name == "llama.cpp":
            with tempfile.TemporaryDirectory() as tmp:
                backend.use_lora(export_lora_gguf(adapter, Path(tmp) / "adapter.gguf", model.config))
                try:
                    yield Variant(label, adapter), backend
                finally:
                    backend.use_lora(None)
            continue
        with_adapter = PeftModel.from_pretrained(model, adapter).eval()
        try:
            yield Variant(label, adapter), TransformersBackend(with_adapter, tokenizer)
        finally:
            with_adapter.unload()


@contextlib.contextmanager
def _steered(steer: SteeringVectors, layers: list[int] | None, scale: float):
    with steer.restricted(layers), steer.scaled(scale):
        yield


def evaluate(
    model, tokenizer, settings: EvalSettings, artifacts: list[str] | None = None, scales: list[float] | None = None,
    output: str | Path | None = None, problems: list[Problem] | None = None, progress: bool = True,
    backend: Backend | None = None, layer_specs: list[str] | None = None, loras: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the base and each artifact (with each layer subset, at each scale), then each LoRA adapter, on the
    same problems; returns the summary.

    `backend` generates every variant (default: `settings.backend` for this model and these artifacts and adapters,
    see brep_rl.rollout); adapters llama.cpp cannot hold (DoRA, ...) run on transformers under `auto`."""
    scales = list(scales or [1.0])
    layer_specs = list(dict.fromkeys(layer_specs or ["all"]))
    artifacts, labels = labelled_paths(list(artifacts or []))
    steered = {variant_label(name, scale, spec, scales, layer_specs) for name in labels for scale in scales for spec in layer_specs}
    loras, lora_labels = labelled_paths(list(loras or []), "--lora", taken=steered)
    for adapter in loras:  # before any generation: they are evaluated last
        if not is_peft_adapter(adapter):
            raise ConfigError(f"--lora {adapter}: not a PEFT adapter folder (expected {' and '.join(ADAPTER_FILES)})")
    problems = problems if problems is not None else load_task(
        settings.task, settings.split, settings.limit, settings.offset, settings.seed, settings.question,
        settings.answer_field, rg_config=settings.rg_config, skip_invalid=settings.skip_invalid,
    )
    store = RecordStore(Path(output) if output else None, settings)
    if backend is None:
        configs = [read_artifact(a)[0] for a in artifacts]
        backend = make_backend(settings.backend, model, tokenizer, model.name_or_path, configs, torch.get_num_threads(),
                               adapters=loras)
    prompts = {p.id: chat_prompt(tokenizer, p.question, settings.instruction, settings.system_prompt) for p in problems}
    prompt_ids = dict(zip(prompts, chat_prompt_ids(tokenizer, problems, settings.instruction, settings.system_prompt)))
    k = settings.samples
    calculator = Calculator(tokenizer) if settings.calculator else None
    variants = []
    total = len(problems) * k * (1 + len(artifacts) * len(scales) * len(layer_specs) + len(loras))
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress, dynamic_ncols=True)

    def every_variant():
        for variant, steer, context in variant_contexts(model, artifacts, labels, scales, layer_specs):
            yield variant, steer, context, backend
        for variant, generator in lora_variants(model, tokenizer, loras, lora_labels, backend):
            yield variant, None, contextlib.nullcontext(), generator

    for variant, steer, context, generator in every_variant():
        variants.append(variant)
        store.check_artifact(variant.label, variant.artifact)
        todo = [p for p in problems if not store.done(variant.label, p, k)]
        bar.update((len(problems) - len(todo)) * k)
        bar.set_postfix_str(f"{variant.label} ({generator.name})")
        # a problem's samples are seeded by the problem alone: the same whatever the batch, the order or a resume,
        # and the same random numbers for every variant (paired draws: differences are the vectors', not luck's)
        seeds = [hash_seed(settings.seed, p.id) for p in todo]
        sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
        with context:
            generator.sync(steer)
            each = generate_each(generator, [prompt_ids[p.id] for p in todo], k, sampling, seeds, settings.batch_size,
                                 calculator)
            for i, rollouts in each:
                store.add(score(variant, [todo[i]], prompts, rollouts, tokenizer, settings))
                bar.update(k)
    bar.close()
    summary = summarize(store, problems, variants, settings)
    if output:
        write_summary(Path(output), summary)
    return summary


def score(variant: Variant, batch: list[Problem], prompts: dict[str, str], rollouts: Rollouts, tokenizer,
          settings: EvalSettings) -> list[dict[str, Any]]:
    k = settings.samples
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    extracted = [extract_answer(t, settings.fallback) for t in texts]
    golds = [p.answer for p in batch for _ in range(k)]
    correct = default_verifier().check(golds, extracted)
    records = []
    for row, text in enumerate(texts):
        problem = batch[row // k]
        records.append({
            "model": variant.label, "artifact": variant.artifact, "scale": variant.scale, "layers": variant.layers,
            "problem_id": problem.id, "sample": row % k, "prompt": prompts[problem.id], "completion": text,
            "extracted": extracted[row], "gold": problem.answer, "correct": correct[row],
            "formatted": has_final_answer_format(text), "tokens": len(rollouts.completion_ids[row]),
            "seconds": rollouts.seconds / len(texts),
        })
    return records


def summarize(store: RecordStore, problems: list[Problem], variants: list[Variant], settings: EvalSettings) -> dict[str, Any]:
    k = settings.samples
    per_problem: dict[str, list[float]] = {}
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        rows = [[store.records[(v.label, p.id, s)] for s in range(k)] for p in problems]
        scores = [sum(r["correct"] for r in rs) / k for rs in rows]
        per_problem[v.label] = scores
        acc, low, high = accuracy_interval(scores, k)
        flat = [r for rs in rows for r in rs]
        tokens = sum(r["tokens"] for r in flat)
        seconds = sum(r["seconds"] for r in flat)
        results[v.label] = {
            "artifact": v.artifact, "scale": v.scale, "layers": v.layers, "problems": len(problems), "samples": k,
            "accuracy": acc, "accuracy_low": low, "accuracy_high": high,
            f"pass@{k}": sum(pass_at_k(k, sum(r["correct"] for r in rs), k) for rs in rows) / len(rows),
            f"maj@{k}": sum(majority_vote([r["extracted"] for r in rs], [r["correct"] for r in rs]) for rs in rows) / len(rows),
            "format_rate": sum(r["formatted"] for r in flat) / len(flat),
            "mean_tokens": tokens / len(flat),
            "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
        }
    paired = {label: paired_difference(per_problem[BASE], scores, k) for label, scores in per_problem.items() if label != BASE}
    summary = {"settings": dataclasses.asdict(settings), "problem_ids": [p.id for p in problems], "models": results,
               "paired_vs_base": paired}
    steered = [label for label in per_problem if label != BASE]
    if len(steered) > 1:  # each later variant against the first: a new stage against the one it builds on
        reference = steered[0]
        summary["reference"] = reference
        summary["paired_vs_reference"] = {
            label: paired_difference(per_problem[reference], per_problem[label], k) for label in steered[1:]}
    return summary


def _delta(d: dict[str, float] | None) -> tuple[str, str]:
    """(difference with its interval, p-value) in points, or dashes."""
    if not d:
        return "–", "–"
    bounds = "undefined" if d["low"] is None or not math.isfinite(d["low"]) else f"{100 * d['low']:+.1f}, {100 * d['high']:+.1f}"
    return f"{100 * d['diff']:+.1f} ({bounds})", f"{d['p']:.3g}"


def markdown_table(summary: dict[str, Any]) -> str:
    k = summary["settings"]["samples"]
    reference = summary.get("reference")
    sampled_columns = f" pass@{k} | maj@{k} |" if k > 1 else ""  # with one sample per problem both are the accuracy again
    head = f"| model | n | accuracy (95% CI) |{sampled_columns} format | mean tokens | tokens/s | Δ vs base (95% CI) | p |"
    if reference:
        head += f" Δ vs {reference} (95% CI) | p |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for label, m in summary["models"].items():
        delta, p = _delta(summary["paired_vs_base"].get(label))
        sampled_cells = f" {100 * m[f'pass@{k}']:.1f}% | {100 * m[f'maj@{k}']:.1f}% |" if k > 1 else ""
        row = (
            f"| {label} | {m['problems']} | {100 * m['accuracy']:.1f}% ({100 * m['accuracy_low']:.1f}–{100 * m['accuracy_high']:.1f}) "
            f"|{sampled_cells} {100 * m['format_rate']:.0f}% | {m['mean_tokens']:.0f} | {m['tokens_per_s']:.1f} | {delta} | {p} |"
        )
        if reference:
            row += " {} | {} |".format(*_delta(summary["paired_vs_reference"].get(label)))
        lines.append(row)
    return "\n".join(lines)


def write_summary(output: Path, summary: dict[str, Any]) -> None:
    write_json(output / "summary.json", summary)
    s = summary["settings"]
    title = f"Evaluation on {s['task']} ({s['split']}), {s['samples']} sample(s) per problem, temperature {s['temperature']}, max {s['max_new_tokens']} new tokens"
    (output / "summary.md").write_text(f"# {title}\n\n{markdown_table(summary)}\n")
