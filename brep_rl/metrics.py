"""Accuracy metrics with honest uncertainty: pass@k (unbiased), maj@k, 95% intervals, paired differences."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k: is the most frequent extracted answer right? Ties go to the answer seen first; no answer never wins."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return next(ok for a, ok in zip(answers, correct) if a == winner)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, not a rounding error away
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): normal 95% interval of a mean over problems."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def accuracy_interval(per_problem: Sequence[float], samples: int) -> tuple[float, float, float]:
    """(mean, low, high) of per-problem accuracies: Wilson with one sample per problem, else normal over problems."""
    if samples == 1:
        successes = round(sum(per_problem))
        return (successes / len(per_problem), *wilson_interval(successes, len(per_problem)))
    mean, low, high = mean_interval(per_problem)
    return mean, max(0.0, low), min(1.0, high)


def mcnemar_exact_p(base: Sequence[bool], other: Sequence[bool]) -> float:
    """Two-sided exact McNemar test: a binomial test on the pairs where exactly one of the two is right."""
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(base: Sequence[float], other: Sequence[float], samples: int) -> dict[str, float]:
    """Mean of other - base over the same problems, its 95% interval, and a p-value (exact McNemar for one
    sample per problem, else a normal test of the mean difference)."""
    if len(base) != len(other):
        raise ValueError(f"paired_difference: {len(base)} base scores vs {len(other)} other scores")
    diffs = [o - b for b, o in zip(base, other)]
    mean, low, high = mean_interval(diffs)
    if samples == 1:
        p = mcnemar_exact_p([b > 0.5 for b in base], [o > 0.5 for o in other])
    else:
        se = (high - mean) / Z95 if math.isfinite(high) else math.inf
        p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else 2 * NormalDist().cdf(-abs(mean / se)))
    return {"diff": mean, "low": low, "high": high, "p": p, "n": len(diffs)}
