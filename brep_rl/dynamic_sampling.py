"""Dynamic sampling (DAPO, arXiv 2503.14476): every optimizer step trains on groups that carry a signal.

A GRPO group whose completions all score the same (all right or all wrong) has zero advantage everywhere: it costs
a forward and backward and teaches nothing. Here such groups are dropped and replaced by groups of freshly drawn
prompts, round after round, up to a cap on the extra generation (verl's `filter_groups.max_num_gen_batches`);
if the cap is hit the batch is topped up with the dropped groups, so its size never changes. The filter reads
binary accuracy, not a shaped reward: with partial credit an all-wrong group would slip through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class ScoredGroup:
    rows: list[dict[str, Any]]  # the dataset rows of one prompt, one per completion
    rollout: Any  # what generated them (handed back to the trainer untouched)
    accuracies: list[float]  # binary accuracy of each completion

    @property
    def informative(self) -> bool:
        return len(set(self.accuracies)) > 1


@dataclass
class FilterStats:
    zero_variance_before: float  # share of the first draw's groups without signal
    zero_variance_after: float  # share of the batch trained on
    generated_groups: int  # groups generated for this batch, the first draw included
    refills: int  # extra rounds of generation

    def as_metrics(self, needed: int) -> dict[str, float]:
        return {
            "dynamic/zero_variance_before": self.zero_variance_before,
            "dynamic/zero_variance_after": self.zero_variance_after,
            "dynamic/extra_generation": self.generated_groups / needed - 1.0,
            "dynamic/refills": float(self.refills),
        }


def informative_groups(
    first: Sequence[ScoredGroup], draw: Callable[[int, int], list[ScoredGroup]], max_refills: int,
) -> tuple[list[ScoredGroup], FilterStats]:
    """Keep the first draw's informative groups; `draw(count, round)` scores `count` fresh groups per refill round,
    at most `max_refills` rounds. Returns as many groups as `first` holds, informative ones first."""
    needed = len(first)
    kept = [g for g in first if g.informative]
    dropped = [g for g in first if not g.informative]
    generated, refills = needed, 0
    while len(kept) < needed and refills < max_refills:
        refills += 1
        fresh = draw(needed - len(kept), refills)
        generated += len(fresh)
        kept += [g for g in fresh if g.informative][: needed - len(kept)]
    batch = kept + dropped[: needed - len(kept)]
    stats = FilterStats(
        zero_variance_before=len(dropped) / needed,
        zero_variance_after=sum(not g.informative for g in batch) / needed,
        generated_groups=generated,
        refills=refills,
    )
    return batch, stats
