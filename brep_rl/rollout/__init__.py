"""Rollout backends: what writes the completions for GRPO and the eval harness.

- `transformers` (hf.py): `model.generate` through the steering hooks. Any model; exact by construction.
- `llama.cpp` (llama_cpp.py): the GGUF base with the vectors as control vectors (a LoRA reference as a llama.cpp LoRA
  adapter, brep_rl/lora_gguf.py); ~3x faster on 2 CPU cores.
Both choose tokens with `sampling.sample_token`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.lora_gguf import lora_tensors
from brep_rl.model import gguf_as_f32, gguf_path
from brep_rl.rollout.base import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    Rollouts,
    Sampling,
    Tool,
    generate_each,
    hash_seed,
    stop_token_ids,
)
from brep_rl.rollout.calculator import Calculator
from brep_rl.rollout.hf import TransformersBackend
from brep_rl.steering import SteeringConfig

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "Calculator", "Rollouts", "Sampling", "Tool", "TransformersBackend", "generate_each", "hash_seed",
    "make_backend", "stop_token_ids",
]


def make_backend(choice: str, model, tokenizer, model_name: str, configs: list[SteeringConfig], threads: int,
                 adapters: Sequence[str] = ()) -> Backend:
    """`auto`: llama.cpp when the base is a GGUF file, llama-cpp-python is installed and it can apply every steering
    config in `configs` and every PEFT LoRA in `adapters` exactly; otherwise transformers (the reason is logged). An
    explicit `llama.cpp` fails with the reason."""
    if choice not in BACKENDS:
        raise ConfigError(f"rollout backend: expected one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "transformers":
        return TransformersBackend(model, tokenizer)
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            raise BackendUnavailable("the llama.cpp backend needs llama-cpp-python: pip install -e '.[fast]'")
        gguf = gguf_path(model_name)
        if gguf is None:
            raise BackendUnavailable(f"llama.cpp needs a GGUF base (the alias 'smollm2-135m' or a .gguf file); got {model_name!r}")
        from brep_rl.rollout.llama_cpp import LlamaCppBackend

        backend = LlamaCppBackend(gguf_as_f32(gguf), stop_token_ids(model, tokenizer), threads)
        for config in configs:
            backend.check(config)
        for adapter in adapters:
            try:
                lora_tensors(adapter, model.config)  # what llama.cpp cannot hold is refused here
            except ArtifactError as e:
                raise BackendUnavailable(str(e)) from None
    except BackendUnavailable as e:
        if choice == "llama.cpp":
            raise
        logger.warning("generating with transformers: %s", e)
        return TransformersBackend(model, tokenizer)
    logger.warning("generating with llama.cpp (%s as fp32, %d threads)", gguf.name, threads)
    return backend
