"""Where steering acts: the decoder layers of a model and, in each, the submodule whose output is steered."""

from __future__ import annotations

import torch
from torch import nn

from brep_rl.errors import ConfigError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the ModuleList with one entry per hidden layer (llama, qwen2, mistral, ... alike)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (config.num_hidden_layers={n})")


def site_module(layer: nn.Module, site: str, layer_index: int) -> nn.Module:
    """The submodule `site` (e.g. "mlp.down_proj") of one decoder layer; a clear error listing what exists."""
    try:
        return layer.get_submodule(site)
    except AttributeError:
        names = [n for n, _ in layer.named_modules() if n]
        raise ConfigError(
            f"steering site {site!r} does not exist in decoder layer {layer_index} ({type(layer).__name__}); "
            f"available sites: {', '.join(names)}"
        ) from None


def steered_sites(model: nn.Module, site: str, layers: list[int]) -> list[nn.Module]:
    """The site module of each of `layers`; an error naming the layers that do not exist."""
    all_layers = decoder_layers(model)
    n = len(all_layers)
    bad = [i for i in layers if i >= n]
    if bad:
        raise ConfigError(f"steering layers {bad} do not exist: the model has {n} decoder layers (0..{n - 1})")
    return [site_module(all_layers[i], site, i) for i in layers]


def output_dim(site: nn.Module, name: str) -> int:
    """The size of a site's output: the dimension of the vector added to it."""
    for attr in ("out_features", "embedding_dim"):
        if isinstance(getattr(site, attr, None), int):
            return getattr(site, attr)
    weight = getattr(site, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    raise ConfigError(f"cannot tell the output size of steering site {name!r} ({type(site).__name__}); pick a Linear site")


def hidden_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base computes in (the vectors are fp32 and cast to it when added)."""
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:  # a base weight, not one of our fp32 vectors
            return p.dtype
    return torch.float32
