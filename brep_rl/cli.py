"""`brep-rl` command line: eval | sft | grpo | inspect."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from brep_rl.steering import ArtifactError, read_artifact


def inspect_artifact(directory: str, as_json: bool = False) -> str:
    """A readable summary of a saved artifact: its config and the per-layer norms of each vector."""
    config, tensors = read_artifact(directory)
    norms = {name: t.float().norm(dim=-1).tolist() for name, t in tensors.items()}
    if as_json:
        return json.dumps({"config": config.to_dict(), "norms": norms}, indent=2)
    layers = config.layers or list(range(len(next(iter(norms.values())))))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    lines = [
        f"steering artifact {directory}",
        f"  base model   {config.base_model} ({config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} layers)",
        f"  site         {config.site}",
        f"  mode         {config.mode}" + (f" (prefix_tokens={config.prefix_tokens})" if config.uses_prefix else ""),
        "  restraint    " + ("none" if config.radius is None else f"radius {config.radius}" + (" x site norm" if config.radius_relative else "")),
        f"  parameters   {sum(t.numel() for t in tensors.values()):,} ({size / 1024:.1f} KiB)",
    ]
    if config.provenance:
        lines.append(f"  provenance   {json.dumps(config.provenance, sort_keys=True)}")
    names = list(norms)
    lines.append("")
    lines.append("  layer  " + "  ".join(f"{n:>8}" for n in names))
    for row, layer in enumerate(layers):
        lines.append(f"  {layer:>5}  " + "  ".join(f"{norms[n][row]:8.4f}" for n in names))
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from brep_rl.evaluate import EvalSettings
    from brep_rl.rollout import BACKENDS

    d = EvalSettings()
    parser.add_argument("--model", default="smollm2-135m", help="alias, .gguf file, HF folder or hub id (default: %(default)s)")
    parser.add_argument("--steering", action="append", default=[], metavar="DIR", help="steering artifact to compare with the base (repeatable)")
    parser.add_argument("--scale", default="1", help="comma-separated steering strengths, e.g. 0.5,1,2 (default: %(default)s)")
    parser.add_argument("--task", default=d.task, help="gsm8k | math500 | rg:<reasoning-gym dataset> | path.jsonl (default: %(default)s)")
    parser.add_argument("--split", default=d.split)
    parser.add_argument("--limit", type=int, default=d.limit, help="number of problems (default: %(default)s)")
    parser.add_argument("--offset", type=int, default=d.offset)
    parser.add_argument("--samples", type=int, default=d.samples, help="samples per problem, for pass@k / maj@k")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--instruction", default=d.instruction, help="appended to every question ('' for none)")
    parser.add_argument("--system-prompt", default=d.system_prompt)
    parser.add_argument("--fallback", default=d.fallback, choices=["last_number", "none"], help="answer extraction when there is no \\boxed{} or ####")
    parser.add_argument("--question", default=d.question, help="question template over JSONL fields, e.g. '{Body} {Question}'")
    parser.add_argument("--answer-field", default=d.answer_field)
    parser.add_argument("--rg-config", type=json.loads, default=None, help="reasoning-gym dataset config as JSON")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid JSONL rows instead of stopping")
    parser.add_argument("--output", default=None, help="folder for samples.jsonl + summary.json/.md; re-running resumes")
    parser.add_argument("--backend", default=d.backend, choices=BACKENDS,
                        help="what generates: auto picks llama.cpp for a GGUF base when llama-cpp-python is installed "
                             "and can apply the artifacts (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run_eval(args: argparse.Namespace) -> None:
    import torch

    from brep_rl.evaluate import EvalSettings, evaluate, markdown_table
    from brep_rl.model import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scale.split(",") if s.strip()]
    settings = EvalSettings(
        task=args.task, split=args.split, limit=args.limit, offset=args.offset, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        seed=args.seed, instruction=args.instruction or None, system_prompt=args.system_prompt, fallback=args.fallback,
        question=args.question, answer_field=args.answer_field, rg_config=args.rg_config, skip_invalid=args.skip_invalid,
        backend=args.backend,
    )
    model, tokenizer = load_base(args.model, dtype=args.dtype)
    summary = evaluate(model, tokenizer, settings, args.steering, scales, args.output)
    print()
    print(markdown_table(summary))
    if args.output:
        print(f"\nper-sample records: {args.output}/samples.jsonl; summary: {args.output}/summary.json, summary.md")


def main(argv: Sequence[str] | None = None) -> int:
    from brep_rl.config import ConfigError
    from brep_rl.data import DataError
    from brep_rl.rollout import BackendUnavailable

    parser = argparse.ArgumentParser(prog="brep-rl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    add_eval_arguments(commands.add_parser("eval", help="compare the base and steered models on a math task"))

    inspect = commands.add_parser("inspect", help="show the config and per-layer norms of a saved steering artifact")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    commands.add_parser("sft", help="train vectors with SFT on truncated answers (see brep-rl sft --help)", add_help=False)
    commands.add_parser("grpo", help="train vectors with GRPO on verifiable rewards (see brep-rl grpo --help)", add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sft"], ["grpo"]):  # the trainer's own parser (YAML config + overrides) takes the rest
        import importlib

        trainer_main = importlib.import_module(f"brep_rl.{argv[0]}").main
        try:
            trainer_main(argv[1:])
        except (ArtifactError, BackendUnavailable, ConfigError, DataError, FileNotFoundError, ValueError) as e:
            print(f"brep-rl {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_artifact(args.directory, as_json=args.json))
        elif args.command == "eval":
            run_eval(args)
    except (ArtifactError, BackendUnavailable, ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"brep-rl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
