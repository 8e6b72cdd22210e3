"""Looking inside steering vectors, and using them without brep-rl: the logit lens, blends, and baked-in weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from brep_rl.errors import ArtifactError
from brep_rl.steering import SteeringVectors, read_artifact
from brep_rl.steering.artifact import save_artifact
from brep_rl.steering.sites import decoder_layers


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, vectors: torch.Tensor, layers: list[int], top: int = 10) -> list[dict]:
    """Each layer's vector read as a hidden state: through the final norm and the unembedding, the tokens it
    promotes and demotes most (the analysis of Sinii et al., arXiv 2505.18706). One row per layer."""
    norm = model.get_decoder().norm
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    logits = head(norm(vectors.to(dtype)[:, None, :]))[:, 0].float()  # [layers, vocab]
    rows = []
    for layer, row in zip(layers, logits):
        centred = row - row.mean()
        up, down = centred.topk(top), (-centred).topk(top)
        rows.append({
            "layer": layer,
            "promotes": [(tokenizer.decode([int(i)]), round(float(v), 3)) for v, i in zip(up.values, up.indices)],
            "demotes": [(tokenizer.decode([int(i)]), round(float(-v), 3)) for v, i in zip(down.values, down.indices)],
        })
    return rows


def layer_cosines(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity between every layer's vector of `a` and every layer's of `b` (default: `a` itself)."""
    b = a if b is None else b
    a, b = nn.functional.normalize(a.float(), dim=-1), nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def blend(artifacts: list[str | Path], weights: list[float], out: str | Path) -> Path:
    """The weighted sum of artifacts made for the same base, mode, site and layers."""
    if len(artifacts) != len(weights) or len(artifacts) < 2:
        raise ArtifactError(f"blend: give two or more artifacts and one weight each; got {len(artifacts)} and {weights}")
    loaded = [read_artifact(a) for a in artifacts]
    first = loaded[0][0]
    for path, (config, _) in zip(artifacts[1:], loaded[1:]):
        facts = ("mode", "site", "layers", "model_type", "hidden_size", "num_hidden_layers", "prefix_tokens")
        differ = [f"{k}: {getattr(first, k)!r} vs {getattr(config, k)!r}" for k in facts if getattr(first, k) != getattr(config, k)]
        if differ:
            raise ArtifactError(f"blend: {artifacts[0]} and {path} do not fit together ({'; '.join(differ)})")
    tensors = {name: sum(w * t[name].float() for w, (_, t) in zip(weights, loaded)) for name in loaded[0][1]}
    config = copy.deepcopy(first)
    config.provenance = {"blend": [{"artifact": str(a), "weight": w} for a, w in zip(artifacts, weights)]}
    return save_artifact(out, config, tensors)


@torch.no_grad()
def merge_into_weights(model: nn.Module, tokenizer, artifact: str | Path, out: str | Path) -> Path:
    """A plain HF model folder with the bias vectors folded into the biases of their site Linear layers (llama's
    `mlp_bias`), loadable by `AutoModelForCausalLM.from_pretrained(out)` without brep-rl."""
    from transformers import AutoModelForCausalLM

    steer = SteeringVectors.from_pretrained(artifact, model)  # every check an artifact gets on load
    config, tensors = steer.config, steer.state_tensors()
    steer.detach()
    if config.uses_prefix:
        raise ArtifactError(f"mode {config.mode!r}: a prefix vector acts on the prompt and the first answer tokens "
                            "only, which weights cannot do; merge works for bias vectors")
    if model.config.model_type != "llama" or not config.site.startswith("mlp."):
        raise ArtifactError(f"merge folds vectors into the MLP biases of llama models (mlp_bias); this is a "
                            f"{model.config.model_type!r} model steered at {config.site!r}")
    merged_config = copy.deepcopy(model.config)
    merged_config.mlp_bias = True
    merged = AutoModelForCausalLM.from_config(merged_config, dtype=next(model.parameters()).dtype)
    missing, unexpected = merged.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(".bias") for name in missing):
        raise ArtifactError(f"merge: the model's weights do not map onto mlp_bias=True ({unexpected or missing})")
    layers = decoder_layers(merged)
    for layer in layers:  # the new MLP biases start at zero: the merged model is the base ...
        for module in layer.mlp.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
    for row, index in enumerate(config.layers):  # ... plus the vectors, at their sites
        layers[index].get_submodule(config.site).bias.copy_(tensors["bias"][row])
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
