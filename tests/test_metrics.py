import math

import pytest

from brep_rl.metrics import (
    accuracy_interval,
    majority_vote,
    mcnemar_exact_p,
    paired_difference,
    pass_at_k,
    wilson_interval,
)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 4, 1.0),  # fewer than k wrong samples: some k-subset always holds a right one
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
        (4, 0, 2, 0.0),
        (4, 4, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_counts_and_breaks_ties_by_first_seen():
    assert majority_vote(["4", "5", "4"], [True, False, True]) is True
    assert majority_vote(["5", "4", "4", "5"], [False, True, True, False]) is False  # tie: "5" came first
    assert majority_vote(["4", "5", "5", "4"], [True, False, False, True]) is True
    assert majority_vote([None, None, "3"], [False, False, True]) is True  # no-answer never wins
    assert majority_vote([None, None], [False, False]) is False


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))
    acc, low, high = accuracy_interval([1, 0, 0, 1], samples=1)
    assert acc == 0.5 and low < 0.5 < high


def test_mcnemar_and_paired_difference():
    base = [True] * 2 + [False] * 18
    steered = [True] * 12 + [False] * 8  # 10 discordant, all in favour of steered
    assert mcnemar_exact_p(base, steered) == pytest.approx(2 / 2**10)
    assert mcnemar_exact_p(base, base) == 1.0
    d = paired_difference([float(b) for b in base], [float(s) for s in steered], samples=1)
    assert d["diff"] == pytest.approx(0.5) and d["low"] > 0 and d["n"] == 20
    d4 = paired_difference([0.25, 0.5, 0.0, 0.25], [0.25, 0.5, 0.0, 0.25], samples=4)
    assert d4["diff"] == 0 and d4["p"] == 1.0


def test_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for successes, n in [(0, 10), (3, 10), (49, 100), (100, 100), (7, 500)]:
        ci = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(successes, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0]
    mean = sum(values) / len(values)
    low, high = stats.norm.interval(0.95, loc=mean, scale=stats.sem(values))
    assert accuracy_interval(values, samples=4) == pytest.approx((mean, max(0, low), min(1, high)), abs=1e-12)
    diff = paired_difference([0.0, 0.5, 0.25, 1.0], [0.5, 0.75, 0.25, 1.0], samples=4)
    z = diff["diff"] / stats.sem([0.5, 0.25, 0.0, 0.0])
    assert diff["p"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-12)
