"""`brep-rl` command line: inspect | eval | sft | grpo."""

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
        f"  restraint    " + ("none" if config.radius is None else f"radius {config.radius}" + (" x site norm" if config.radius_relative else "")),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brep-rl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show the config and per-layer norms of a saved steering artifact")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_artifact(args.directory, as_json=args.json))
    except (ArtifactError, FileNotFoundError, ValueError) as e:
        print(f"brep-rl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
