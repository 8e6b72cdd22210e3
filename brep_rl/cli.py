"""`brep-rl VERB [--config file.yaml] [--flag value ...]`: one entry point for every verb.

Arguments are the dataclasses of brep_rl/arguments.py, parsed by TRL's TrlParser: a YAML config, then command-line
overrides. A bad value stops the command while parsing, before any model loads, with one line naming the flag; a
user error later (a missing file, an artifact that does not fit) is one line too; anything else is a bug and keeps
its traceback. scripts/*.py call this, so `accelerate launch scripts/grpo.py` behaves the same.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trl import TrlParser

from brep_rl.arguments import (
    BlendArguments,
    EvalArguments,
    EvidenceArguments,
    ExportArguments,
    GRPODataArguments,
    InspectArguments,
    LoraArguments,
    MergeArguments,
    ModelArguments,
    SFTDataArguments,
    SteeringArguments,
    SteeringGRPOConfig,
    SteeringSFTConfig,
    ValidationArguments,
)
from brep_rl.errors import ConfigError, UserError


class ArgumentParser(TrlParser):
    """TrlParser whose errors are one line (argparse would print a usage block first)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(prog: str, types: tuple, argv: Sequence[str] | None, yaml_config: bool = True) -> tuple:
    """The dataclasses of `types` from `argv` (and from `--config FILE` when `yaml_config`); exits with one line on a
    bad value: an unknown flag, a choice not allowed, a value its dataclass refuses, an unreadable config."""
    parser = ArgumentParser(types, prog=prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if yaml_config:
            return tuple(parser.parse_args_and_config(argv))
        return tuple(parser.parse_args_into_dataclasses(argv))
    except (ValueError, OSError) as e:  # raised while building the dataclasses: about the arguments given
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)


@dataclass
class Verb:
    help: str
    types: tuple
    run: Callable[..., object]
    yaml_config: bool = True


def _sft(*args):
    from brep_rl.sft import run_sft

    run_sft(*args)


def _grpo(*args):
    from brep_rl.grpo import run_grpo

    run_grpo(*args)


def _lora(*args):
    from brep_rl.lora import run_lora_grpo

    run_lora_grpo(*args)


def _lora_sft(*args):
    from brep_rl.lora import run_lora_sft

    run_lora_sft(*args)


def _eval(args: EvalArguments) -> None:
    import torch

    from brep_rl.evaluate import evaluate, markdown_table
    from brep_rl.model import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load_base(args.model, dtype=args.dtype, device=device)
    summary = evaluate(model, tokenizer, args.settings(), args.steering, args.scales(), args.output,
                       layer_specs=args.layers, loras=args.lora)
    print()
    print(markdown_table(summary))
    if args.output:
        print(f"\nper-sample records: {args.output}/samples.jsonl; summary: {args.output}/summary.json, summary.md")


def _inspect(args: InspectArguments) -> None:
    from brep_rl.steering.artifact import describe_artifact

    print(describe_artifact(args.directory, as_json=args.json))
    if args.logit_lens:
        from brep_rl.analysis import logit_lens
        from brep_rl.model import load_base
        from brep_rl.steering import read_artifact

        config, tensors = read_artifact(args.directory)
        model, tokenizer = load_base(args.model or config.base_model)
        for name, vectors in tensors.items():
            print(f"\nlogit lens of the {name} vectors (top {args.top} tokens promoted | demoted)")
            for row in logit_lens(model, tokenizer, vectors, config.layers, args.top):
                print(f"  {row['layer']:>3}  " + " ".join(repr(t) for t, _ in row["promotes"])
                      + "  |  " + " ".join(repr(t) for t, _ in row["demotes"]))
    if args.plot:
        from brep_rl.plots import plot_artifact

        print(f"plot: {plot_artifact(args.directory, args.plot, args.compare)}")


def _export(args: ExportArguments) -> None:
    from brep_rl.lora_gguf import is_peft_adapter
    from brep_rl.steering import read_artifact
    from brep_rl.steering.gguf import export_control_vector

    if is_peft_adapter(args.artifact):
        _export_lora(args)
        return
    if args.bias_only:
        print("--bias-only: exporting the bias vectors; the prefix vectors are dropped", file=sys.stderr)
    out = export_control_vector(args.artifact, args.out, args.scale, args.bias_only)
    print(f"control vector: {out}\nserve it: llama-server -m {_served_base(read_artifact(args.artifact)[0].base_model)} "
          f"--control-vector {out}")


def _served_base(name: str | None) -> str:
    """The GGUF to serve an export with: the fp32 copy of the base, the weights brep-rl trained against."""
    from brep_rl.model import gguf_as_f32, gguf_path

    base = gguf_path(name or "")
    return str(gguf_as_f32(base)) if base else "BASE.gguf"


def _export_lora(args: ExportArguments) -> None:
    from transformers import AutoConfig

    from brep_rl.lora_gguf import ADAPTER_CONFIG, export_lora_gguf
    from brep_rl.model import resolve_model_path

    if args.bias_only:
        raise ConfigError(f"--bias_only: {args.artifact} is a LoRA adapter, not steering vectors with a bias part")
    base = args.model or json.loads((Path(args.artifact) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{args.artifact}: its {ADAPTER_CONFIG} names no base model: pass --model")
    out = export_lora_gguf(args.artifact, args.out, AutoConfig.from_pretrained(resolve_model_path(base)[0]), args.scale)
    print(f"LoRA adapter: {out}\nserve it: llama-server -m {_served_base(base)} --lora {out}")


def _merge(args: MergeArguments) -> None:
    from brep_rl.analysis import merge_into_weights
    from brep_rl.model import load_base
    from brep_rl.steering import read_artifact

    model, tokenizer = load_base(args.model or read_artifact(args.artifact)[0].base_model, dtype=args.dtype)
    print(f"model with the vectors baked in: {merge_into_weights(model, tokenizer, args.artifact, args.out)}")


def _blend(args: BlendArguments) -> None:
    from brep_rl.analysis import blend

    print(f"blended artifact: {blend(args.artifacts, args.weight_list(), args.out)}")


def _evidence(args: EvidenceArguments) -> None:
    from brep_rl.evidence import run

    run(args.plan)


VERBS = {
    "sft": Verb("train vectors with SFT on truncated answer prefixes",
                (ModelArguments, SteeringArguments, SFTDataArguments, SteeringSFTConfig, ValidationArguments), _sft),
    "grpo": Verb("train vectors with GRPO on verifiable math rewards",
                 (ModelArguments, SteeringArguments, GRPODataArguments, SteeringGRPOConfig, ValidationArguments), _grpo),
    "eval": Verb("compare the base and steered models on a math task", (EvalArguments,), _eval),
    "inspect": Verb("show the config and per-layer norms of a saved steering artifact", (InspectArguments,), _inspect),
    "export": Verb("write an artifact's bias vectors as a llama.cpp control vector, or a LoRA adapter as a llama.cpp LoRA "
                   "(.gguf)", (ExportArguments,), _export),
    "merge": Verb("fold bias vectors into the base's weights: a plain HF model folder", (MergeArguments,), _merge),
    "blend": Verb("the weighted sum of artifacts", (BlendArguments,), _blend),
    "lora": Verb("the LoRA GRPO reference, on the data and settings of a steering run",
                 (ModelArguments, LoraArguments, GRPODataArguments, SteeringGRPOConfig, ValidationArguments), _lora),
    "lora-sft": Verb("the LoRA SFT reference, on the data and settings of a steering SFT run",
                     (ModelArguments, LoraArguments, SFTDataArguments, SteeringSFTConfig, ValidationArguments), _lora_sft),
    "evidence": Verb("the learning-evidence matrix: train every variant, pick on validation, report on test",
                     (EvidenceArguments,), _evidence, yaml_config=False),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: brep-rl VERB [--config file.yaml] [--flag value ...]   (brep-rl VERB --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {verb.help}" for name, verb in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        print(f"brep-rl: error: unknown verb {name!r} (choose from {', '.join(VERBS)})", file=sys.stderr)
        return 2
    positional = next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))
    if positional:  # `brep-rl inspect DIR`, `brep-rl export ART ...`, `brep-rl blend A B ...`
        flag = {"inspect": "--directory", "export": "--artifact", "merge": "--artifact", "blend": "--artifacts"}.get(name)
        if flag:
            rest = [flag, *rest]
    verb = VERBS[name]
    from brep_rl.training import exit_rank, quiet_dependency_warnings
    from reward import RewardConfigError

    quiet_dependency_warnings()
    parsed = parse(f"brep-rl {name}", verb.types, rest, verb.yaml_config)
    code = 0
    try:
        verb.run(*parsed)
    except (UserError, RewardConfigError, FileNotFoundError, PermissionError) as e:
        print(f"brep-rl {name}: error: {e}", file=sys.stderr)
        code = 2
    exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
