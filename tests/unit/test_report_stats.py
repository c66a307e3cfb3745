"""Report statistics against known values: published examples, scipy, hand-computed tables."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from orchestrator.reporting.stats import (
    PairCount,
    auc,
    hits_at,
    holm,
    mcnemar_p,
    newcombe_paired,
    paired_difference,
    position_bias,
    reliability,
    score_as_probability,
    stage1_first_prior,
    wilson,
    within_query_auc,
)


def test_mcnemar_exact_matches_the_published_example():
    # Bentur et al. (2009) airway hyper-responsiveness before/after stem cell transplantation, as
    # analysed by Fagerland, Lydersen and Laake, BMC Med Res Methodol 13:91 (2013), Table 1:
    # discordant pairs 1 and 7; exact conditional p = 2 * binomcdf(1, 8, 0.5) = 0.070.
    assert mcnemar_p(1, 7) == pytest.approx(18 / 256)
    assert round(mcnemar_p(7, 1), 3) == 0.070


def test_mcnemar_exact_equals_the_binomial_sum_by_hand():
    # b = 6, c = 16: 2 * sum_{i<=6} C(22, i) / 2^22, in integers.
    by_hand = 2 * sum(math.comb(22, i) for i in range(7)) / 2**22
    assert mcnemar_p(6, 16) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.052479, abs=1e-6)
    # A larger table (Agresti's presidential approval ratings: 150 and 86 discordant).
    assert mcnemar_p(150, 86) == pytest.approx(scipy_stats.binomtest(86, 236, 0.5).pvalue, rel=1e-9)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_hits_at_counts_missing_positive_as_miss():
    assert hits_at([1, 3, None, 10, 11], 10) == [1, 1, 0, 1, 0]
    assert hits_at([1, 3, None], 1) == [1, 0, 0]


def test_wilson_equals_scipy_at_every_count():
    for n in (1, 2, 5, 20, 189, 500):
        for hits in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for level in (0.9, 0.95, 0.99):
                ours = wilson(hits, n, level)
                ref = scipy_stats.binomtest(hits, n).proportion_ci(level, method="wilson")
                assert ours.low == pytest.approx(ref.low, abs=1e-12), (hits, n, level)
                assert ours.high == pytest.approx(ref.high, abs=1e-12), (hits, n, level)
                assert ours.estimate == hits / n


def test_wilson_refuses_impossible_counts_and_is_vacuous_without_data():
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
    for hits, n in ((3, 2), (-1, 4)):
        with pytest.raises(ValueError, match="hits"):
            wilson(hits, n)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, 1.0)


def test_mcnemar_equals_scipy_on_fixed_tables():
    # 0/0: no discordant query, no evidence; 5/0 and 0/9: the cases, where a bootstrap
    # said p=0.011 and 0.0002; n=1: a single discordant query.
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(scipy_stats.binomtest(5, 5).pvalue) == pytest.approx(0.0625)
    assert mcnemar_p(0, 9) == pytest.approx(scipy_stats.binomtest(0, 9).pvalue) == pytest.approx(2 / 2**9)
    assert mcnemar_p(1, 0) == 1.0 == scipy_stats.binomtest(1, 1).pvalue
    for b, c in ((13, 9), (8, 0), (3, 11), (40, 61)):
        assert mcnemar_p(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c).pvalue, rel=1e-12)


def test_newcombe_paired_matches_the_published_example():
    # Fagerland, Lydersen and Laake, Statistical Analysis of Contingency Tables (2017), ch. 8:
    # complete response before/after consolidation (Cavo et al. 2012), table [[59, 6], [16, 80]]:
    # Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046.
    estimate, low, high = newcombe_paired(59, 6, 16, 80)
    assert (round(estimate, 4), round(low, 4), round(high, 4)) == (-0.0621, -0.1186, -0.0046)
    # Swapping the two arms mirrors the interval.
    estimate2, low2, high2 = newcombe_paired(59, 16, 6, 80)
    assert (estimate2, low2, high2) == pytest.approx((-estimate, -high, -low))


def test_newcombe_paired_at_the_edges():
    assert newcombe_paired(0, 0, 0, 0) == (0.0, -1.0, 1.0)
    for table in ((0, 5, 0, 0), (3, 0, 0, 7), (0, 0, 9, 0), (1, 0, 0, 0), (0, 1, 0, 0), (180, 5, 0, 4)):
        estimate, low, high = newcombe_paired(*table)
        assert -1.0 <= low <= estimate <= high <= 1.0, table
    # No discordant query: the difference is exactly 0, inside a non-degenerate interval.
    estimate, low, high = newcombe_paired(30, 0, 0, 20)
    assert estimate == 0.0 and low < 0.0 < high


def test_paired_difference_counts_and_tests_the_discordant_queries():
    run = [1, 1, 0, 1, 0, 1, 1]
    base = [1, 0, 0, 0, 1, 0, 1]
    d = paired_difference(run, base)
    assert (d.n, d.both, d.only_a, d.only_b) == (7, 2, 3, 1)
    assert d.estimate == pytest.approx((5 - 3) / 7)
    assert d.p_value == pytest.approx(mcnemar_p(3, 1))
    assert (d.estimate, d.low, d.high) == pytest.approx(newcombe_paired(2, 3, 1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1, 0], [1])


def test_holm_by_hand():
    # Sorted 0.01, 0.02, 0.03, 0.5 against m=4: 0.04, 0.06, 0.06 (kept monotone), 0.5.
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert holm([]) == []
    assert holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0]


def test_reliability_and_ece_by_hand():
    # Two bins used: [0.2, 0.3) with p 0.2 and 0.2 (one positive of two: frequency 0.5) and
    # [0.9, 1.0] with p 0.9, 1.0 and 0.95 (all positive). ECE = 2/5 * |0.5 - 0.2| + 3/5 * |1 - 0.95|.
    rel = reliability([0.2, 0.2, 0.9, 1.0, 0.95], [1, 0, 1, 1, 1])
    assert rel.n == 5
    assert rel.ece == pytest.approx(2 / 5 * 0.3 + 3 / 5 * 0.05)
    assert [(b.low, b.high, b.n) for b in rel.bins] == [(0.2, pytest.approx(0.3), 2), (0.9, 1.0, 3)]
    assert rel.bins[0].frequency == 0.5 and rel.bins[0].mean_probability == pytest.approx(0.2)
    assert (rel.bins[1].frequency_low, rel.bins[1].frequency_high) == pytest.approx((wilson(3, 3).low, 1.0))
    # A perfectly calibrated judge in the limit: frequency equals confidence bin by bin.
    assert reliability([0.0, 1.0], [0, 1]).ece == 0.0
    with pytest.raises(ValueError, match="no predictions"):
        reliability([], [])


def test_score_scales_map_to_probabilities():
    assert score_as_probability(3.0, "likert") == 0.5
    assert score_as_probability(75.0, "direct") == 0.75
    assert score_as_probability(0.4, "yesno") == 0.4


def test_within_query_separation_is_not_pooled():
    # Query A scores everything high, query B everything low; within each query the positive
    # is above its own candidates, so the within-query separation is 1 while pooling says less.
    a = ([0.9], [0.8, 0.85])
    b = ([0.3], [0.1, 0.2])
    assert within_query_auc([a, b]) == 1.0
    assert auc([0.9, 0.3], [0.8, 0.85, 0.1, 0.2]) == 0.75  # pooled: 0.3 sits below query A's others
    assert within_query_auc([([], [0.1])]) is None


def test_auc_counts_ties_as_half():
    assert auc([3, 4], [1, 2, 3]) == pytest.approx(5.5 / 6)
    assert auc([1], [1]) == 0.5
    assert auc([], [1]) is None


def test_stage1_prior_from_positive_rank_shares():
    share = {1: 0.6, 2: 0.2, 3: 0.0}
    assert stage1_first_prior(1, 2, share) == pytest.approx(0.75)
    assert stage1_first_prior(2, 1, share) == pytest.approx(0.25)
    assert stage1_first_prior(3, 4, share) == 0.5


def test_position_bias_by_hand():
    share = {1: 0.6, 2: 0.2, 3: 0.2}
    counts = [
        # rank 1 shown before rank 2, positive first: 8 of 10 won by the first
        PairCount(1, 2, True, False, 10, 8),
        # rank 3 shown before rank 1, positive second: the first won 3 of 4 (the positive 1 of 4)
        PairCount(3, 1, False, True, 4, 3),
        # neither positive, gap 1
        PairCount(2, 3, False, False, 6, 6),
    ]
    pb = position_bias(counts, share)
    assert pb.n == 20
    assert pb.observed == pytest.approx(17 / 20)
    expected = (10 * 0.75 + 4 * 0.25 + 6 * 0.5) / 20
    assert pb.expected == pytest.approx(expected)
    assert pb.excess == pytest.approx(17 / 20 - expected)
    assert [g.gap for g in pb.by_gap] == [-2, 1]
    gap1 = pb.by_gap[1]
    assert (gap1.n, gap1.observed) == (16, pytest.approx(14 / 16))
    assert gap1.expected == pytest.approx((10 * 0.75 + 6 * 0.5) / 16)
    assert (pb.positive_first.n, pb.positive_first.hits) == (10, 8)
    assert (pb.positive_second.n, pb.positive_second.hits) == (4, 1)
    assert (pb.positive_second.low, pb.positive_second.high) == (wilson(1, 4).low, wilson(1, 4).high)
    assert (gap1.low, gap1.high) == (wilson(14, 16).low, wilson(14, 16).high)
    with pytest.raises(ValueError, match="no pairwise verdicts"):
        position_bias([], share)
