"""One token from one row of logits, the same way for every backend: temperature, then top-k, then top-p, with the
semantics of transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper (top-p measures mass
within what top-k kept).

`sample_token` takes a numpy row (llama.cpp's logits); `sample_tokens` takes a batch of rows where they live (the
transformers backend's scores) and chooses what `sample_token` would, row by row, with the same draws. Greedy rows on
a GPU are chosen there (`greedy_tokens_on_device`), so that a step of an evaluation moves a token and a log-prob per
row to the CPU, not the batch's scores in float64 (100 MB at batch 256). Sampled rows always go to numpy: a draw needs
a cumulative sum, which CUDA has only in a nondeterministic form that torch refuses under deterministic algorithms,
our training default. On the CPU numpy row by row is the faster way anyway (benchmarks/sampling_cost.py).
"""

from __future__ import annotations

import numpy as np
import torch

from brep_rl.rollout.base import Sampling


def filter_logits(z: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """`z` with every token outside top-k, then outside the top-p nucleus of what is left, set to -inf."""
    z = np.array(z, dtype=np.float64)
    if 0 < top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf  # ties with the k-th logit stay, as in TopKLogitsWarper
    if top_p < 1.0:
        order = np.argsort(z, kind="stable")  # ascending, as TopPLogitsWarper sorts
        kept = z[order]
        probs = np.exp(kept - kept.max())
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1.0 - top_p
        remove[-1] = False  # the most likely token always stays
        z[order[remove]] = -np.inf
    return z


def sequence_rngs(sampling: Sampling, prompts: int, n: int, seeds: list[int] | None = None) -> list[np.random.Generator]:
    """One generator per completion, prompt-major: completion j of prompt p draws from the seed sequence
    (seeds[p], j), or (sampling.seed, p, j) without `seeds`. A completion's draws then depend on its own seed alone,
    not on which batch it ran in, which sequences stopped before it, or which backend ran it."""
    keys = [[seed] for seed in seeds] if seeds is not None else [[sampling.seed, p] for p in range(prompts)]
    if len(keys) != prompts:
        raise ValueError(f"one seed per prompt: {prompts} prompts, {len(keys)} seeds")
    return [np.random.default_rng([*key, j]) for key in keys for j in range(n)]


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> tuple[int, float]:
    """(token, its log-prob under softmax(logits / temperature)): greedy at temperature 0, else a draw from the
    top-k / top-p filtered distribution with `rng` (the caller's generator: no global state)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z if sampling.temperature <= 0 else z / sampling.temperature
    z = z - z.max()
    log_total = np.log(np.exp(z).sum())
    if sampling.temperature <= 0:
        token = int(np.argmax(z))
        return token, float(z[token] - log_total)
    weights = np.exp(filter_logits(z, sampling.top_k, sampling.top_p))
    cumulative = np.cumsum(weights)
    token = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(z) - 1)
    return token, float(z[token] - log_total)


def sample_tokens(scores: torch.Tensor, sampling: Sampling,
                  rngs: list[np.random.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_token for each row of `scores` (row i draws from rngs[i]): the chosen tokens and their log-probs, one
    per row, on the rows' device."""
    if scores.device.type != "cpu" and sampling.temperature <= 0:
        return greedy_tokens_on_device(scores)
    chosen = [sample_token(row, sampling, rng) for row, rng in zip(scores.double().cpu().numpy(), rngs)]
    return (torch.tensor([token for token, _ in chosen], device=scores.device),
            torch.tensor([logprob for _, logprob in chosen], dtype=torch.float64, device=scores.device))


def greedy_tokens_on_device(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_token's greedy choice for every row at once, in float64 where `scores` lives: (argmax, its log-prob)."""
    z = scores.double()
    z = z - z.max(dim=-1, keepdim=True).values
    tokens = z.argmax(-1)
    return tokens, z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.log(torch.exp(z).sum(-1))
