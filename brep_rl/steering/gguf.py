"""llama.cpp control vectors: a bias on `mlp.down_proj` of decoder layer l is a vector added to layer l's output,
which is what llama.cpp's `--control-vector` adds. The file (as repeng and llama.cpp's cvector-generator write it):
GGUF with general.architecture "controlvector", controlvector.model_hint, controlvector.layer_count, and one F32
1-D tensor `direction.<l>` per layer, l counted as transformers counts decoder layers (llama.cpp's il); llama.cpp
has no direction.0 (it refuses one) and applies a control vector at every position.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from brep_rl.errors import ArtifactError
from brep_rl.steering.artifact import read_artifact
from brep_rl.steering.config import SteeringConfig

_DIRECTION = re.compile(r"^direction\.(\d+)$")


def control_vector_layers(config: SteeringConfig, tensors: dict[str, torch.Tensor], bias_only: bool) -> dict[int, np.ndarray]:
    """{layer: vector} of an artifact as a control vector; refuses what llama.cpp would apply differently."""
    if (obstacle := config.control_vector_obstacle()) is not None:
        raise ArtifactError(obstacle)
    if config.uses_prefix and not bias_only:
        raise ArtifactError(f"mode {config.mode!r}: llama.cpp applies a control vector at every position, so a prefix "
                            "vector cannot be exported; pass --bias-only to export the bias part alone")
    if "bias" not in tensors:
        raise ArtifactError(f"mode {config.mode!r} has no bias vector to export")
    return {layer: tensors["bias"][row].float().numpy() for row, layer in enumerate(config.layers)}


def write_gguf(out: str | Path, arch: str, fields: dict[str, str | int], tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF file of architecture `arch` with string and uint32 `fields` and `tensors`, written beside and renamed:
    llama.cpp never reads half a file."""
    import gguf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, value in fields.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def export_control_vector(artifact: str | Path, out: str | Path, scale: float = 1.0, bias_only: bool = False) -> Path:
    """Write the artifact's bias vectors (times `scale`) as a llama.cpp control-vector GGUF."""
    config, tensors = read_artifact(artifact)
    vectors = control_vector_layers(config, tensors, bias_only)
    fields = {"controlvector.model_hint": config.model_type or "", "controlvector.layer_count": len(vectors)}
    return write_gguf(out, "controlvector", fields,
                      {f"direction.{layer}": (vector * scale).astype(np.float32) for layer, vector in vectors.items()})


def read_control_vector(path: str | Path) -> tuple[str | None, dict[int, np.ndarray]]:
    """(model hint, {layer: vector}) of a control-vector GGUF, from brep-rl, repeng or cvector-generator."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: control-vector file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a GGUF file ({e})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise ArtifactError(f"{path}: not a control vector (general.architecture is "
                            f"{arch.contents() if arch else None!r}, expected 'controlvector')")
    hint = reader.fields.get("controlvector.model_hint")
    vectors = {}
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer == 0:
            raise ArtifactError(f"{path}: direction.0 (llama.cpp control vectors start at layer 1)")
        vectors[layer] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not vectors:
        raise ArtifactError(f"{path}: no direction.<layer> tensors")
    return (hint.contents() if hint else None), dict(sorted(vectors.items()))
