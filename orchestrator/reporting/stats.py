"""Statistics for the report, as pure functions over plain numbers (per-query hits, counts).

The SQL that produces the inputs lives in ``db/reports.py``; nothing here opens a session.
Every method is exact or closed-form, so a report is the same on every machine:

- ``wilson``: a Recall@k (a proportion of queries) with its Wilson score interval.
- ``mcnemar_p``: exact (conditional, binomial) McNemar test on the discordant queries.
- ``newcombe_paired``: the difference of two paired proportions (run minus baseline R@k) with
  Newcombe's (1998) square-and-add interval from the two Wilson intervals and the phi correlation.
- ``holm``: Holm's step-down adjustment over a family of p-values.
- ``reliability``: a reliability diagram (equal-width bins) and the expected calibration error.
- ``position_bias``: how often the first-shown tile wins against what stage-1 ranks predict, and
  the positive's win rate when shown first versus second (equal for a judge without bias).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class Proportion:
    """``hits`` of ``n`` with a two-sided Wilson score interval (fractions, not percent)."""

    hits: int
    n: int
    estimate: float | None  # hits / n; None without data
    low: float
    high: float


def wilson(hits: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Proportion:
    """Wilson (1927) score interval for ``hits / n``; ``[0, 1]`` when ``n`` is 0."""
    if n < 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n, got hits={hits}, n={n}")
    z = _z(confidence)
    if n == 0:
        return Proportion(0, 0, None, 0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Exact ends at 0 and n (the formula gives them up to rounding).
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return Proportion(hits, n, p, low, high)


@dataclass(frozen=True)
class PairedDifference:
    """Run A against B on the same ``n`` queries: A-only hits (fixed), B-only hits (broken),
    the difference of proportions with its Newcombe interval and the exact McNemar p-value."""

    n: int
    both: int
    only_a: int
    only_b: int
    estimate: float
    low: float
    high: float
    p_value: float


def hits_at(ranks: Iterable[int | None], k: int) -> list[int]:
    """Per-query 0/1: is the positive within the first ``k``? (None = not retrieved = a miss.)"""
    return [1 if r is not None and r <= k else 0 for r in ranks]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts cannot be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binom  # here, not at the top: every CLI command loads this module

    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), n, 0.5)))


def newcombe_paired(
    both: int, only_a: int, only_b: int, neither: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float, float]:
    """p_A - p_B for a paired 2x2 table, with Newcombe's (1998, method 10) interval.

    Square-and-add of the Wilson intervals of p_A and p_B, corrected by their correlation
    (phi, shrunk towards 0 by N/2 when positive, as Newcombe and Fagerland et al. 2017 do).
    """
    n = both + only_a + only_b + neither
    if min(both, only_a, only_b, neither) < 0:
        raise ValueError("counts cannot be negative")
    if n == 0:
        return 0.0, -1.0, 1.0
    a_hits, b_hits = both + only_a, both + only_b
    pa, pb = a_hits / n, b_hits / n
    ia, ib = wilson(a_hits, n, confidence), wilson(b_hits, n, confidence)
    margins = a_hits * (n - a_hits) * b_hits * (n - b_hits)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_a * only_b
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    estimate = pa - pb
    low = estimate - math.sqrt(
        max(0.0, (pa - ia.low) ** 2 - 2 * phi * (pa - ia.low) * (ib.high - pb) + (ib.high - pb) ** 2)
    )
    high = estimate + math.sqrt(
        max(0.0, (pb - ib.low) ** 2 - 2 * phi * (pb - ib.low) * (ia.high - pa) + (ia.high - pa) ** 2)
    )
    return estimate, max(-1.0, low), min(1.0, high)


def paired_difference(
    a_hits: Sequence[int], b_hits: Sequence[int], confidence: float = DEFAULT_CONFIDENCE
) -> PairedDifference:
    """A against B on paired 0/1 outcomes (same queries, same order): Newcombe interval, exact McNemar."""
    if len(a_hits) != len(b_hits):
        raise ValueError(f"paired samples differ in length ({len(a_hits)} and {len(b_hits)})")
    both = only_a = only_b = 0
    for a, b in zip(a_hits, b_hits, strict=True):
        if a and b:
            both += 1
        elif a:
            only_a += 1
        elif b:
            only_b += 1
    n = len(a_hits)
    estimate, low, high = newcombe_paired(both, only_a, only_b, n - both - only_a - only_b, confidence)
    return PairedDifference(n, both, only_a, only_b, estimate, low, high, mcnemar_p(only_a, only_b))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the input order (family-wise error control)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# calibration


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    n: int
    mean_probability: float  # mean predicted probability in the bin
    frequency: float  # share of the bin whose outcome is 1
    frequency_low: float  # Wilson interval of that share
    frequency_high: float


@dataclass(frozen=True)
class Reliability:
    n: int
    ece: float  # expected calibration error: sum over bins of n_b / n * |frequency - confidence|
    bins: tuple[ReliabilityBin, ...]  # non-empty bins only


def reliability(
    probabilities: Sequence[float],
    outcomes: Sequence[int],
    n_bins: int = 10,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Reliability:
    """Reliability diagram over ``n_bins`` equal-width bins of [0, 1] (the last bin closed) and the
    expected calibration error (Naeini et al. 2015; Guo et al. 2017) of predicted probabilities."""
    if len(probabilities) != len(outcomes):
        raise ValueError("probabilities and outcomes differ in length")
    if not probabilities:
        raise ValueError("no predictions to calibrate")
    p = np.clip(np.asarray(probabilities, dtype=float), 0.0, 1.0)
    y = np.asarray(outcomes, dtype=float)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        if not count:
            continue
        hits = int(y[mask].sum())
        share = wilson(hits, count, confidence)
        mean_p = float(p[mask].mean())
        ece += count / p.size * abs(hits / count - mean_p)
        bins.append(
            ReliabilityBin(b / n_bins, (b + 1) / n_bins, count, mean_p, hits / count, share.low, share.high)
        )
    return Reliability(int(p.size), float(ece), tuple(bins))


# Pointwise scores on the prompt's own scale, mapped to [0, 1] to be read as probabilities.
SCORE_RANGES = {"yesno": (0.0, 1.0), "reason": (0.0, 1.0), "likert": (1.0, 5.0), "direct": (0.0, 100.0)}


def score_as_probability(score: float, prompt: str) -> float:
    low, high = SCORE_RANGES.get(prompt, (0.0, 1.0))
    return min(1.0, max(0.0, (score - low) / (high - low)))


def auc(positives: Sequence[float], others: Sequence[float]) -> float | None:
    """P(a positive scores above another candidate), ties counting half (Mann-Whitney U / n1 n2)."""
    pos = np.asarray(positives, dtype=float)
    neg = np.sort(np.asarray(others, dtype=float))
    if pos.size == 0 or neg.size == 0:
        return None
    below = np.searchsorted(neg, pos, side="left")
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * tied).sum() / (pos.size * neg.size))


def within_query_auc(per_query: Iterable[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """Mean over queries of ``auc(positives, others)`` within the query: does the judge rank the
    true tile above that query's other candidates? (Pooling scores over queries would also
    reward a judge for scoring easy queries high.) Queries without both kinds are left out."""
    values = [a for pos, neg in per_query if (a := auc(pos, neg)) is not None]
    return float(np.mean(values)) if values else None


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
    observed: float  # share won by the first-shown tile ...
    low: float  # ... with its Wilson interval
    high: float
    expected: float  # share the stage-1 ranks alone predict for the first-shown tile


@dataclass(frozen=True)
class PositionBias:
    n: int
    observed: float
    expected: float
    by_gap: tuple[GapRate, ...]
    positive_first: Proportion  # comparisons with the positive shown first, and how many it won
    positive_second: Proportion  # ... shown second (n = 0: none)

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


def position_bias(
    counts: Iterable[PairCount],
    positive_rank_share: Mapping[int, float],
    confidence: float = DEFAULT_CONFIDENCE,
) -> PositionBias:
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
    by_gap = tuple(
        GapRate(gap, int(n), w / n, (ci := wilson(int(w), int(n), confidence)).low, ci.high, e / n)
        for gap, (n, w, e) in sorted(gaps.items())
    )
    return PositionBias(
        n=total,
        observed=wins / total,
        expected=expected_sum / total,
        by_gap=by_gap,
        positive_first=wilson(pos_first[1], pos_first[0], confidence),
        positive_second=wilson(pos_second[1], pos_second[0], confidence),
    )
