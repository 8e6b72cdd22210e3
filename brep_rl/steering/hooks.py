"""The forward hooks that put steering vectors into a model, and the per-row prefix window.

How a forward pass is steered:
1. A pre-forward hook on the model works out, once per call, which positions are real tokens (attention mask) and
   which lie in the prefix window, from the absolute column of each position (cache length + offset, so cached
   decoding is exact) and each row's response start.
2. It calls the SteeringVectors module - a real module call, so DeepSpeed ZeRO-3 gathers the parameters around it -
   which returns the scaled vectors and the two masks.
3. A forward hook on each steered site adds `bias_mask * bias[l] + prefix_mask * prefix[l]` to its output, cast to
   the hidden dtype. Padding positions get nothing; zero vectors leave the output bit-identical.

Response start (where the answer begins, per row): set explicitly with `SteeringVectors.window(start)` for training
forwards (right-padded rows: each row's prompt length; left-padded: the padded prompt width). Otherwise a forward on
an empty cache treats its whole input as the prompt and remembers its width for the cached decoding steps that
follow, which is exactly what `generate()` on a left-padded batch needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from brep_rl.steering.sites import hidden_dtype

if TYPE_CHECKING:
    from brep_rl.steering.vectors import SteeringVectors


@dataclass
class ActiveSteering:
    """What the site hooks add during one forward call, shaped so the common cases cost one add or nothing:
    bias_mask None means every position is a real token (no padding); prefix None means no position of this call
    lies in the window (decoding past it); prefix_everywhere means every position does."""

    bias: torch.Tensor | None  # [L, d], scaled, in the autograd graph
    prefix: torch.Tensor | None
    bias_mask: torch.Tensor | None  # [B, T, 1] in the hidden dtype: real (non-padding) tokens
    prefix_mask: torch.Tensor  # [B, T, 1] in the hidden dtype: real tokens inside the prefix window
    prefix_everywhere: bool = False


def token_positions(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(valid [B, T] bool: real tokens, columns [T]: absolute positions, cache length) of one model call."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    batch, length = tokens.shape[:2]
    device = tokens.device
    cache = kwargs.get("past_key_values")
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    columns = torch.arange(past, past + length, device=device)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() == 2:
        valid = (mask[:, columns] if mask.shape[1] == past + length else mask[:, -length:]).bool()
    else:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    return valid, columns, past


class SteeringHooks:
    """The hooks of one SteeringVectors on one model; `remove()` takes them all off."""

    def __init__(self, steer: SteeringVectors, model: nn.Module, sites: list[nn.Module]):
        self.steer = steer
        self.generation_start: int | None = None  # prompt width of the sequence being generated
        self.active: ActiveSteering | None = None
        self.handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
            *(site.register_forward_hook(self._site_hook(row)) for row, site in enumerate(sites)),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _response_start(self, batch: int, past: int, length: int, device: torch.device) -> torch.Tensor:
        explicit = self.steer.response_start
        if explicit is not None:
            start = explicit.to(device)
            if start.numel() == 1:
                return start.expand(batch)
            if start.numel() != batch:
                raise ValueError(f"window(): got {start.numel()} response starts for a batch of {batch} rows")
            return start
        if past == 0 or self.generation_start is None:
            # A fresh sequence: its input is the prompt (what was already cached counts as prompt too).
            self.generation_start = past + length if past == 0 else past
        return torch.full((batch,), self.generation_start, dtype=torch.long, device=device)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.active = None
        if not self.steer.enabled:
            return
        valid, columns, past = token_positions(args, kwargs)
        start = self._response_start(valid.shape[0], past, valid.shape[1], valid.device)
        bias, prefix, bias_mask, prefix_mask = self.steer(valid, columns, start)
        dtype = hidden_dtype(module)
        self.active = ActiveSteering(
            bias=bias,
            prefix=prefix if bool(prefix_mask.any()) else None,
            bias_mask=None if bool(bias_mask.all()) else bias_mask.to(dtype),
            prefix_mask=prefix_mask.to(dtype),
            prefix_everywhere=bool(prefix_mask.all()),
        )

    def _after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self.active = None  # do not keep the graph or masks alive between calls

    def _site_hook(self, row: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            if active is None:
                return None
            dtype = output.dtype
            if active.bias is not None:
                bias = active.bias[row].to(dtype)
                output = output + (bias if active.bias_mask is None else active.bias_mask * bias)
            if active.prefix is not None:
                prefix = active.prefix[row].to(dtype)
                output = output + (prefix if active.prefix_everywhere else active.prefix_mask * prefix)
            return output

        return hook
