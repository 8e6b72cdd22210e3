"""A steering artifact on disk: `steering.safetensors` + `steering_config.json`, and every check made on load."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.steering.config import CONFIG_NAME, SteeringConfig

WEIGHTS_NAME = "steering.safetensors"
CARD_NAME = "README.md"


def model_card(config: SteeringConfig, tensors: dict[str, torch.Tensor]) -> str:
    """A README beside the vectors, in the layout PEFT adapters use on a hub: what they are, how they were made, how
    to use them with brep-rl and with llama.cpp."""
    provenance = config.provenance or {}
    metrics = {k: v for k, v in provenance.items() if "accuracy" in k or k in ("global_step", "stage", "task", "split")}
    size = sum(t.numel() for t in tensors.values())
    lines = [
        "---", "library_name: brep-rl", f"base_model: {config.base_model}", "tags: [steering-vectors, brep-rl]", "---", "",
        f"# Steering vectors for {config.base_model}", "",
        f"- mode `{config.mode}` on `{config.site}` of layers {config.layers} ({size:,} parameters)"
        + (f", prefix window {config.prefix_tokens} answer tokens" if config.uses_prefix else ""),
        f"- base: {config.model_type}, hidden size {config.hidden_size}, {config.num_hidden_layers} layers; "
        + ("its weights' fingerprint is recorded: loading onto another model of the same shape is refused"
           if config.base_fingerprint else "no weight fingerprint recorded"),
        "- restraint: " + ("none" if config.radius is None else f"L2 radius {config.radius}"
                            + (" x the site's median output norm" if config.radius_relative else "")),
    ]
    if metrics:
        lines.append("- training: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    lines += ["", "## Use", "", "```bash", "brep-rl eval --steering THIS_FOLDER --task gsm8k --limit 100    # base vs steered",
              "brep-rl inspect THIS_FOLDER --logit-lens", "```", "", "```python",
              "from brep_rl import SteeringVectors, load_base",
              f'model, tokenizer = load_base("{config.base_model}")',
              'steer = SteeringVectors.from_pretrained("THIS_FOLDER", model)   # model.generate(...) is now steered',
              "```"]
    if config.control_vector_obstacle() is None:
        lines += ["", "With llama.cpp (a control vector at every position"
                  + (": the prefix vectors are dropped" if config.uses_prefix else "") + "):", "", "```bash",
                  "brep-rl export THIS_FOLDER --out vectors.gguf" + (" --bias-only" if config.uses_prefix else ""),
                  "llama-server -m BASE.gguf --control-vector vectors.gguf", "```"]
    return "\n".join(lines) + "\n"


def save_artifact(directory: str | Path, config: SteeringConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the tensors, the config and a model card (README.md) into `directory`.

    Each file is written beside its destination and renamed into place, so a kill never leaves a half-written
    file; other files in the folder (a trainer's checkpoints) are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".steering.tmp-", dir=directory))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "mode": config.mode})
        config.to_json_file(tmp / CONFIG_NAME)
        (tmp / CARD_NAME).write_text(model_card(config, tensors))
        umask = os.umask(0)
        os.umask(umask)
        for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            os.chmod(tmp / name, 0o666 & ~umask)  # ordinary file permissions, not the temp folder's
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_artifact(directory: str | Path) -> tuple[SteeringConfig, dict[str, torch.Tensor]]:
    """Read and check a saved artifact without a model (used by `brep-rl inspect`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: steering artifact folder not found")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory}: missing {name} (a steering artifact holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = SteeringConfig.from_json_file(directory / CONFIG_NAME)
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{directory / WEIGHTS_NAME}: corrupt or not a safetensors file ({e})") from None
    return config, tensors


def check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], mode: str, source: str) -> None:
    """The tensors a checkpoint holds are the ones these vectors have, with finite values."""
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != got:
        raise ArtifactError(f"{source}: expected tensors {expected} for mode {mode!r}, got {got}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{source}: tensor {name!r} holds NaN or inf values")


def base_fingerprint(model: nn.Module) -> list[float] | None:
    """The first values of three weight matrices of the base (first, middle, last): two models of the same shape
    but other weights differ here, and the same base loaded in another dtype agrees to its rounding. None where
    the weights are partitioned (DeepSpeed ZeRO-3) and cannot be read."""
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and "brep_steering" not in name]
    if not matrices or any(hasattr(p, "ds_id") for p in matrices):
        return None
    picked = (matrices[0], matrices[len(matrices) // 2], matrices[-1])
    return [round(float(v), 6) for p in picked for v in p.detach().flatten()[:8].float().cpu()]


def _same_fingerprint(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-6) for x, y in zip(a, b))


def check_fits(config: SteeringConfig, model: nn.Module, strict: bool = True) -> None:
    """A config saved with an artifact names the base it was made for: refuse a model that differs in shape, or
    (with `strict`) in its weights, by the recorded fingerprint."""
    cfg = model.config
    facts = {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers}
    wrong = [f"{k}: artifact {getattr(config, k)!r}, model {v!r}" for k, v in facts.items() if getattr(config, k) not in (None, v)]
    if wrong:
        raise ArtifactError(
            f"steering vectors made for base {config.base_model!r} do not fit this model "
            f"({getattr(model, 'name_or_path', type(model).__name__)}): " + "; ".join(wrong)
        )
    here = base_fingerprint(model) if strict and config.base_fingerprint else None
    if here is not None and not _same_fingerprint(config.base_fingerprint, here):
        raise ArtifactError(
            f"steering vectors made for base {config.base_model!r} do not fit this model "
            f"({getattr(model, 'name_or_path', type(model).__name__)}): same shapes, other weights (the artifact's "
            "base fingerprint differs); load with strict=False to apply them anyway"
        )


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per vector name, the largest per-layer ||got - want|| / ||want||: how far two sets of vectors (a resumed run
    and an uninterrupted one, two machines) are apart, on a scale that does not depend on the vectors' size."""
    if got.keys() != want.keys():
        raise ValueError(f"relative_difference: vectors {sorted(got)} vs {sorted(want)}")
    return {name: float(((got[name].float() - w.float()).norm(dim=-1) / w.float().norm(dim=-1).clamp_min(1e-12)).max())
            for name, w in want.items()}


def describe_artifact(directory: str | Path, as_json: bool = False) -> str:
    """A readable summary of a saved artifact: its config and the per-layer norms of each vector."""
    config, tensors = read_artifact(directory)
    norms = {name: t.float().norm(dim=-1).tolist() for name, t in tensors.items()}
    if as_json:
        return json.dumps({"config": config.to_dict(), "norms": norms}, indent=2)
    layers = config.layers or list(range(len(next(iter(norms.values())))))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    restraint = "none" if config.radius is None else f"radius {config.radius}" + (" x site norm" if config.radius_relative else "")
    lines = [
        f"steering artifact {directory}",
        f"  base model   {config.base_model} ({config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} layers)",
        f"  site         {config.site}",
        f"  mode         {config.mode}" + (f" (prefix_tokens={config.prefix_tokens})" if config.uses_prefix else ""),
        f"  restraint    {restraint}",
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
