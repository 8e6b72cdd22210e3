"""The transformers backend: `model.generate` through the steering hooks (any model; exact by construction).

Tokens are chosen by `sample_tokens` - `sample_token`, which the llama.cpp backend uses, for a batch - inside a logits
processor, so both backends sample alike, the sampled tokens' log-probs come back, and the draws come from a
generator owned by the call: generate() itself decodes greedily over the processor's choice and never touches
torch's global RNG.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from brep_rl.errors import ConfigError
from brep_rl.rollout.base import Rollouts, Sampling, Tool, stop_token_ids
from brep_rl.rollout.sampling import sample_tokens, sequence_rngs
from brep_rl.steering import SteeringVectors


class _SampleWith(LogitsProcessor):
    """Chooses each row's next token with sample_tokens and records its log-prob; the scores it returns leave
    generate()'s greedy step nothing else to pick. The log-probs stay on the model's device until the end."""

    def __init__(self, sampling: Sampling, rngs: list[np.random.Generator]):
        self.sampling, self.rngs = sampling, rngs
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens, logprobs = sample_tokens(scores.detach(), self.sampling, self.rngs)
        self.steps.append(logprobs)
        picked = torch.full_like(scores, -torch.inf)
        picked[torch.arange(len(tokens), device=scores.device), tokens] = 0.0
        return picked

    def logprobs(self) -> list[list[float]]:
        """Per row, the log-prob of every token it chose."""
        return torch.stack(self.steps, dim=1).tolist() if self.steps else [[] for _ in self.rngs]


class TransformersBackend:
    """`model.generate` on a left-padded batch; the steering hooks inside the model see every step."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)

    def sync(self, steer: SteeringVectors | None) -> None:
        pass  # the hooks read the live parameters and contexts

    def close(self) -> None:
        pass

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                 seeds: list[int] | None = None, tool: Tool | None = None) -> Rollouts:
        if tool is not None:  # generate decodes inside transformers: nothing can write between its tokens
            raise ConfigError(f"a tool in the loop (--calculator) needs the llama.cpp backend, not {self.name}")
        greedy = sampling.temperature <= 0
        rows = prompt_ids if greedy else [p for p in prompt_ids for _ in range(n)]  # greedy copies are identical
        pad = self.tokenizer.pad_token_id
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=self.model.device)
        chooser = _SampleWith(sampling, sequence_rngs(sampling, len(prompt_ids), 1 if greedy else n, seeds))
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                do_sample=False, logits_processor=LogitsProcessorList([chooser]),  # greedy over our choice
            )
        seconds = time.perf_counter() - start
        completions, logprobs = [], []
        for row, row_logprobs in zip(out[:, width:].tolist(), chooser.logprobs()):
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            completions.append(row[:end])
            logprobs.append(row_logprobs[:end])
        if greedy:
            completions = [c for c in completions for _ in range(n)]
            logprobs = [lp for lp in logprobs for _ in range(n)]
        return Rollouts([p for p in prompt_ids for _ in range(n)], completions, logprobs, seconds)
