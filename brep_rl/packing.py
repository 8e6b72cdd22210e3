"""Micro-batches packed by completion length: the same GRPO update for a fraction of the compute.

TRL shuffles a generation batch's rows and splits them into `steps_per_generation` micro-batches, every one padded
to the longest completion of the whole generation batch: one sample at the token cap makes every micro-batch pay for
the cap (GSM8K, 192 tokens: ~6% of the samples reach it, the mean is ~75). When the loss is a sum over the
generation batch's tokens divided by their count (loss_type dapo or cispo) and the batch makes one optimizer step,
the gradient does not depend on which micro-batch a row is in. So the rows are sorted by completion length, split
into as many micro-batches as before, and each is cut to its own longest completion. Rows whose advantage is zero
(every row of a group whose samples all score the same) add 0 x ratio to that sum: with beta = 0 they are left out,
all but as many as keep every micro-batch non-empty (the trainer runs, and DDP syncs, one forward and backward per
micro-batch) and every process at the same number of rows (TRL gathers per-row metrics across processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PackStats:
    rows: float  # share of the generation batch's rows trained on
    cells: float  # completion positions run through the model, as a share of what TRL's split runs

    def as_metrics(self) -> dict[str, float]:
        return {"packing/rows": self.rows, "packing/cells": self.cells}


def signal_rows(batches: list[dict[str, Any]]) -> int:
    """How many rows of the generation batch have a non-zero advantage."""
    return int(sum(_has_signal(batch["advantages"]).sum() for batch in batches))


def pack_micro_batches(batches: list[dict[str, Any]], keep_rows: int | None = None) -> tuple[list[dict[str, Any]], PackStats]:
    """`batches`: one generation batch as TRL split it (same keys; tensors and lists by row, 0-dim tensors shared).
    Returns as many micro-batches, sorted by completion length and cut to their longest completion. `keep_rows`:
    train the rows with a non-zero advantage and the shortest others up to this many (None: every row)."""
    merged = {key: _concat([batch[key] for batch in batches]) for key in batches[0]}
    mask = merged["completion_mask"]
    lengths, rows = mask.sum(1), torch.arange(mask.size(0))
    kept = rows
    if keep_rows is not None:
        signal = _has_signal(merged["advantages"])
        spare = rows[~signal][lengths[~signal].argsort(stable=True)]  # the shortest first: the cheapest to carry
        kept = torch.cat([rows[signal], spare[: max(0, keep_rows - int(signal.sum()))]])
    order = kept[lengths[kept].argsort(stable=True)]
    packed = [_rows(merged, chunk, mask.size(1)) for chunk in order.tensor_split(len(batches))]
    cells = sum(batch["completion_mask"].numel() for batch in packed) / mask.numel()
    return packed, PackStats(rows=len(kept) / len(rows), cells=cells)


def _has_signal(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.reshape(len(advantages), -1).ne(0).any(1)


def _concat(values: list) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(values)
    if isinstance(first, list):
        return [item for value in values for item in value]
    return first  # a 0-dim tensor (num_items_in_batch) or None: the same in every micro-batch


def _rows(merged: dict[str, Any], index: torch.Tensor, width: int) -> dict[str, Any]:
    """The rows `index` of every per-row value; completion-aligned tensors cut to the longest completion among them
    (a later position never changes an earlier one's log-prob, and outside the mask it is not in the loss)."""
    used = merged["completion_mask"][index].any(0).nonzero()
    longest = int(used.max()) + 1 if len(used) else 1
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            value = value[index]
            if value.ndim > 1 and value.size(1) == width and not key.startswith("prompt"):
                value = value[:, :longest]
        elif isinstance(value, list):
            value = [value[i] for i in index.tolist()]
        out[key] = value
    return out
