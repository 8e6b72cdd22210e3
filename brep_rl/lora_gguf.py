"""A PEFT LoRA adapter as a llama.cpp LoRA adapter (GGUF), so that the LoRA reference runs where the vectors run:
llama.cpp, with the calculator, at llama.cpp's speed (`brep-rl eval --lora`, `brep-rl export ADAPTER`).

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type "lora", the base's
architecture, and for each adapted weight W of the base GGUF a pair `W.lora_a` (PEFT's lora_A, [r, in]) and
`W.lora_b` (lora_B, [out, r]). Two things differ from the PEFT file. The conversion to GGUF permutes the rows of the
query and key projections (llama.cpp's rotary layout; transformers undoes it on loading), so lora_b of q_proj and
k_proj is permuted the same way. And PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into lora_b
with no adapter.lora.alpha key, which llama.cpp then applies at scale 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from brep_rl.errors import ArtifactError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# HF model types whose llama.cpp architecture is "llama": convert_hf_to_gguf permutes their q/k rows
LLAMA_ARCH_MODEL_TYPES = ("llama", "mistral")


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def adapter_scaling(adapter: str | Path, model_config) -> float:
    """PEFT's scaling of B @ A for this adapter on `model_config`'s base (an HF config); refuses what llama.cpp's
    LoRA adapters cannot hold."""
    adapter = Path(adapter)
    if not is_peft_adapter(adapter):
        raise ArtifactError(f"{adapter}: not a PEFT adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if model_config.model_type not in LLAMA_ARCH_MODEL_TYPES:
        raise ArtifactError(f"{adapter}: llama.cpp LoRA export supports model types {', '.join(LLAMA_ARCH_MODEL_TYPES)}, "
                            f"not {model_config.model_type!r}")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"{adapter}: a {config.get('peft_type')!r} adapter; only LoRA has a llama.cpp form")
    refused = {
        "use_dora": "DoRA's magnitude vectors",
        "lora_bias": "a bias on lora_B",
        "modules_to_save": "fully trained copies of whole modules",
        "rank_pattern": "ranks that differ between modules",
        "alpha_pattern": "alphas that differ between modules",
    }
    found = [what for key, what in refused.items() if config.get(key)]
    if found:
        raise ArtifactError(f"{adapter}: this adapter has {', '.join(found)}, which llama.cpp's LoRA adapters do "
                            "not hold (transformers runs it)")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: each head's rows from halves (HF) to interleaved pairs (GGUF)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def lora_tensors(adapter: str | Path, model_config, scale: float = 1.0) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array} of a PEFT adapter on `model_config`'s architecture (an HF config), its
    strength times `scale`."""
    import gguf

    adapter = Path(adapter)
    scaling = adapter_scaling(adapter, model_config) * scale
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model_config.num_hidden_layers)
    heads = {"q_proj": model_config.num_attention_heads,
             "k_proj": model_config.num_key_value_heads or model_config.num_attention_heads}
    out = {}
    for key, value in sorted(load_file(str(adapter / ADAPTER_WEIGHTS)).items()):
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if kind not in ("A.weight", "B.weight") or name is None:
            raise ArtifactError(f"{adapter}: tensor {key!r} has no llama.cpp counterpart (llama.cpp adapts the "
                                "linear weights of the base: attention, MLP, output)")
        value = value.astype(np.float32)
        if kind == "B.weight":
            value = value * np.float32(scaling)
            if (projection := module.rpartition(".")[2]) in heads:
                value = permute_rows(value, heads[projection])
        out[f"{name}.lora_{kind[0].lower()}"] = np.ascontiguousarray(value)
    if not out:
        raise ArtifactError(f"{adapter}: the adapter holds no LoRA weights")
    return out


def export_lora_gguf(adapter: str | Path, out: str | Path, model_config, scale: float = 1.0) -> Path:
    """Write the adapter (times `scale`) as a llama.cpp LoRA GGUF for the base `model_config` describes."""
    from brep_rl.steering.gguf import write_gguf

    return write_gguf(out, "llama", {"general.type": "adapter", "adapter.type": "lora"},
                      lora_tensors(adapter, model_config, scale))
