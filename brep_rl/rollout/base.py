"""What every rollout backend is: the protocol, the sampling settings, the rollout record, and seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from brep_rl.errors import BackendUnavailable
from brep_rl.steering import SteeringVectors

BACKENDS = ("auto", "transformers", "llama.cpp")

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "Rollouts", "Sampling", "Tool", "generate_each", "hash_seed",
           "stop_token_ids"]


class Tool(Protocol):
    """Something in the generation loop (the Calculator): it may write tokens for a completion."""

    def __call__(self, completion_ids: list[int]) -> list[int]:
        """The tokens to write next, seen after each sampled token ([] for none)."""

    def banned(self, completion_ids: list[int], since_write: int) -> set[int]:
        """Tokens the next sample may not be, `since_write` sampled tokens after a write ended (e.g. digits that
        would run on from a written number)."""


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]  # one per completion
    completion_ids: list[list[int]]  # prompt-major, n per prompt; ends with the stop token when one was sampled
    logprobs: list[list[float]] | None  # per sampled token, log softmax(logits / temperature); None if not measured
    seconds: float
    # per token: 0 if a tool wrote it or restricted its draw, 1 if the policy's own; None without a tool
    tool_mask: list[list[int]] | None = None


class Backend(Protocol):
    name: str

    def sync(self, steer: SteeringVectors | None) -> None:
        """Make the next generations use `steer` as it is now (None or disabled: the base)."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                 seeds: list[int] | None = None, tool: Tool | None = None) -> Rollouts:
        """`n` completions of every prompt (token ids, no padding). Completion j of prompt p samples from its own
        generator, seeded by (seeds[p], j), or (sampling.seed, p, j) without `seeds` (see sequence_rngs); the
        global RNG is never touched. A `tool` in the loop: llama.cpp only (others raise ConfigError)."""

    def close(self) -> None:
        """Free what the backend holds outside Python (a no-op where there is nothing)."""


def generate_each(backend: Backend, prompt_ids: list[list[int]], n: int, sampling: Sampling, seeds: list[int],
                  running: int, tool: Tool | None = None) -> Iterator[tuple[int, Rollouts]]:
    """(index of a prompt, its `n` completions) for every prompt, as each finishes, with about `running` sequences
    decoded at once. A backend with its own `generate_each` (llama.cpp) starts the next prompt as soon as a
    prompt's sequences are done; any other generates `running // n` prompts per call. Only the llama.cpp backend
    runs a `tool` (it decodes token by token in Python)."""
    if hasattr(backend, "generate_each"):
        yield from backend.generate_each(prompt_ids, n, sampling, seeds, running, tool)
        return
    per_call = max(1, running // n)
    for start in range(0, len(prompt_ids), per_call):
        chunk = prompt_ids[start : start + per_call]
        out = backend.generate(chunk, n, sampling, seeds[start : start + per_call], tool)
        for i in range(len(chunk)):
            rows = slice(i * n, (i + 1) * n)
            logprobs = out.logprobs[rows] if out.logprobs is not None else None
            yield start + i, Rollouts(out.prompt_ids[rows], out.completion_ids[rows], logprobs, out.seconds / len(chunk))


def hash_seed(*parts: object) -> int:
    """A sampling seed fixed by what it is for (run seed, step, rank, ...), not by call order."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def stop_token_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {i for i in (tokenizer.eos_token_id, *eos) if i is not None}
