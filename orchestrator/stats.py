"""Statistics for Table 1, as pure functions: bootstrap intervals, paired tests, position bias.

Everything here takes plain numbers (per-query hits, counts) and returns plain numbers; the SQL
that produces the inputs lives in ``db/reports.py``. Resampling is seeded, so a report is
reproducible to the last digit. Imports no session, engine, Celery app or model.

- ``bootstrap_mean``: percentile bootstrap over queries for a mean (Recall@k is the mean of
  per-query 0/1 hits).
- ``mcnemar``: exact (conditional, binomial) McNemar test on paired top-1 hits.
- ``paired_bootstrap``: the difference of two paired means (run minus baseline R@k), its
  percentile interval and a two-sided bootstrap p-value, resampling queries jointly.
- ``position_bias``: how often the first-shown tile wins against what stage-1 ranks predict, and
  the positive's win rate when shown first versus second (equal for a judge without bias).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile bootstrap interval, on the scale of the data."""

    estimate: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired binary outcomes (A = the run, B = the baseline).

    ``only_a`` counts pairs where A hits and B misses (the run fixed the query), ``only_b``
    where B hits and A misses (the run broke it); concordant pairs carry no information.
    """

    only_a: int
    only_b: int
    p_value: float


@dataclass(frozen=True)
class PairedDifference:
    """mean(A - B) over paired queries, its percentile interval and a bootstrap p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    n: int


def hits_at(ranks: Iterable[int | None], k: int) -> list[int]:
    """Per-query 0/1: is the positive within the first ``k``? (None = not retrieved = a miss.)"""
    return [1 if r is not None and r <= k else 0 for r in ranks]


def _check_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")


def bootstrap_means(values: Sequence[float], n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples of ``values`` (n draws with replacement).

    The mean of a resample depends only on how often each distinct value was drawn, so the
    draw is one multinomial over the distinct values rather than n indices: the same
    distribution, but O(distinct values) per resample, so a 50,000-query run costs what a
    50-query run does (hits take two values, paired differences three).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    distinct, counts = np.unique(x, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(x.size, counts / x.size, size=n_resamples)
    return draws @ distinct / x.size


def bootstrap_mean(
    values: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval (resampling the values)."""
    _check_settings(n_resamples, confidence)
    means = bootstrap_means(values, n_resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(np.mean(values)), float(low), float(high), len(values))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts cannot be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binom  # here, not at the top: every CLI command loads this module

    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), n, 0.5)))


def mcnemar(a_hits: Sequence[int], b_hits: Sequence[int]) -> McNemar:
    """Exact McNemar test on paired 0/1 outcomes (same queries, same order)."""
    _same_length(a_hits, b_hits)
    only_a = sum(1 for a, b in zip(a_hits, b_hits, strict=True) if a and not b)
    only_b = sum(1 for a, b in zip(a_hits, b_hits, strict=True) if b and not a)
    return McNemar(only_a, only_b, mcnemar_p(only_a, only_b))


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedDifference:
    """mean(a - b) with a percentile interval from resampling the pairs (queries) jointly.

    The p-value is two-sided: twice the share of resampled differences on the far side of zero,
    counted as (count + 1) / (resamples + 1) so it is never reported as exactly 0 (Davison and
    Hinkley, 1997, eq. 4.11); with no difference observed it is 1.
    """
    _check_settings(n_resamples, confidence)
    _same_length(a, b)
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = bootstrap_means(diff, n_resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    estimate = float(diff.mean())
    if estimate == 0.0:
        p = 1.0
    else:
        far = int(np.count_nonzero(means <= 0.0) if estimate > 0 else np.count_nonzero(means >= 0.0))
        p = min(1.0, 2.0 * (far + 1) / (n_resamples + 1))
    return PairedDifference(estimate, float(low), float(high), p, int(diff.size))


def auc(positives: Sequence[float], others: Sequence[float]) -> float | None:
    """P(a positive scores above another candidate), ties counting half (Mann-Whitney U / n1 n2)."""
    pos = np.asarray(positives, dtype=float)
    neg = np.sort(np.asarray(others, dtype=float))
    if pos.size == 0 or neg.size == 0:
        return None
    below = np.searchsorted(neg, pos, side="left")
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * tied).sum() / (pos.size * neg.size))


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} and {len(b)})")


# ----------------------------------------------------------------------------------------------
# position bias of pairwise judges


@dataclass(frozen=True)
class PairCount:
    """Verdicts of one kind of comparison: stage-1 ranks of the tiles shown first and second."""

    first_rank: int
    second_rank: int
    first_positive: bool
    second_positive: bool
    n: int
    first_wins: int


@dataclass(frozen=True)
class GapRate:
    """Comparisons whose tiles are ``gap`` stage-1 ranks apart (second's rank minus first's)."""

    gap: int
    n: int
    observed: float  # share won by the first-shown tile
    expected: float  # share the stage-1 ranks alone predict for the first-shown tile


@dataclass(frozen=True)
class PositionBias:
    n: int
    observed: float
    expected: float
    by_gap: tuple[GapRate, ...]
    positive_first_n: int  # comparisons with the positive shown first ...
    positive_first_wins: float | None  # ... and how often it won
    positive_second_n: int
    positive_second_wins: float | None

    @property
    def excess(self) -> float:
        """First-shown wins beyond what stage-1 ranks alone predict (a fraction).

        Judge skill and position bias both raise it; the positive's win rate shown first versus
        shown second separates the two.
        """
        return self.observed - self.expected


def stage1_first_prior(first_rank: int, second_rank: int, positive_rank_share: Mapping[int, float]) -> float:
    """P(the first tile is the better match) from stage-1 ranks alone.

    With p(r) the share of queries whose positive sits at stage-1 rank r, a judge that knew only
    the ranks would pick the first tile with probability p(r1) / (p(r1) + p(r2)); 1/2 when stage 1
    never put a positive at either rank.
    """
    p1 = positive_rank_share.get(first_rank, 0.0)
    p2 = positive_rank_share.get(second_rank, 0.0)
    return 0.5 if p1 + p2 <= 0.0 else p1 / (p1 + p2)


def position_bias(counts: Iterable[PairCount], positive_rank_share: Mapping[int, float]) -> PositionBias:
    """Observed first-shown win rate against the stage-1 prediction, overall and per rank gap.

    The positive-shown-first/second win rates are the model-free check: a judge without
    position bias finds the positive equally often in either place.
    """
    gaps: dict[int, list[float]] = {}
    total = wins = 0
    expected_sum = 0.0
    pos_first = [0, 0]  # n, positive won
    pos_second = [0, 0]
    for c in counts:
        if c.n <= 0:
            continue
        prior = stage1_first_prior(c.first_rank, c.second_rank, positive_rank_share)
        g = gaps.setdefault(c.second_rank - c.first_rank, [0, 0, 0.0])
        g[0] += c.n
        g[1] += c.first_wins
        g[2] += prior * c.n
        total += c.n
        wins += c.first_wins
        expected_sum += prior * c.n
        if c.first_positive and not c.second_positive:
            pos_first[0] += c.n
            pos_first[1] += c.first_wins
        elif c.second_positive and not c.first_positive:
            pos_second[0] += c.n
            pos_second[1] += c.n - c.first_wins
    if total == 0:
        raise ValueError("no pairwise verdicts to measure position bias on")
    by_gap = tuple(GapRate(gap, int(n), w / n, e / n) for gap, (n, w, e) in sorted(gaps.items()))
    return PositionBias(
        n=total,
        observed=wins / total,
        expected=expected_sum / total,
        by_gap=by_gap,
        positive_first_n=pos_first[0],
        positive_first_wins=pos_first[1] / pos_first[0] if pos_first[0] else None,
        positive_second_n=pos_second[0],
        positive_second_wins=pos_second[1] / pos_second[0] if pos_second[0] else None,
    )
