"""Statistics against known values: a published McNemar example, binomial theory, scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from orchestrator.stats import (
    Interval,
    PairCount,
    auc,
    bootstrap_mean,
    bootstrap_means,
    hits_at,
    mcnemar,
    mcnemar_p,
    paired_bootstrap,
    position_bias,
    stage1_first_prior,
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


def test_mcnemar_without_discordant_pairs_or_balanced_is_one():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_mcnemar_counts_fixed_and_broken_queries():
    run = [1, 1, 0, 1, 0, 1]
    base = [1, 0, 0, 0, 1, 0]
    out = mcnemar(run, base)
    assert (out.only_a, out.only_b) == (3, 1)
    assert out.p_value == pytest.approx(mcnemar_p(3, 1))
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([1, 0], [1])


def test_hits_at_counts_missing_positive_as_miss():
    assert hits_at([1, 3, None, 10, 11], 10) == [1, 1, 0, 1, 0]
    assert hits_at([1, 3, None], 1) == [1, 0, 0]


def test_bootstrap_is_reproducible_with_a_seed():
    hits = [1] * 61 + [0] * 39
    assert bootstrap_mean(hits, seed=0) == bootstrap_mean(hits, seed=0)
    # The report's default (10,000 resamples, seed 0) gives this interval, on every machine.
    assert bootstrap_mean(hits, seed=0) == Interval(0.61, 0.51, 0.71, 100)
    same = bootstrap_means(hits, 500, seed=7)
    assert np.array_equal(same, bootstrap_means(hits, 500, seed=7))
    assert not np.array_equal(same, bootstrap_means(hits, 500, seed=8))


def test_bootstrap_of_a_proportion_matches_binomial_quantiles():
    # Resampling n hits with replacement draws Binomial(n, p_hat) hits: the percentile interval
    # is that distribution's 2.5% and 97.5% quantiles over n.
    hits = [1] * 61 + [0] * 39
    ci = bootstrap_mean(hits, n_resamples=20_000, seed=0)
    lo, hi = scipy_stats.binom.ppf([0.025, 0.975], 100, 0.61) / 100
    assert ci.low == pytest.approx(lo, abs=0.011)
    assert ci.high == pytest.approx(hi, abs=0.011)
    assert ci.low < 0.61 < ci.high


def test_bootstrap_agrees_with_index_resampling_and_scipy():
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 2.0, size=60)
    ours = bootstrap_mean(values, n_resamples=20_000, seed=3)
    # Plain index resampling, written out.
    idx = np.random.default_rng(4).integers(0, values.size, size=(20_000, values.size))
    naive = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    ref = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20_000, method="percentile", random_state=5
    ).confidence_interval
    assert ours.low == pytest.approx(naive[0], abs=0.05)
    assert ours.high == pytest.approx(naive[1], abs=0.05)
    assert ours.low == pytest.approx(ref.low, abs=0.05)
    assert ours.high == pytest.approx(ref.high, abs=0.05)


def test_bootstrap_of_a_constant_is_a_point():
    ci = bootstrap_mean([1, 1, 1, 1], n_resamples=100)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1, 0], confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean([1, 0], n_resamples=0)


def test_paired_bootstrap_without_difference():
    a = [1, 0, 1, 1, 0]
    out = paired_bootstrap(a, a, n_resamples=500)
    assert (out.estimate, out.low, out.high, out.p_value, out.n) == (0.0, 0.0, 0.0, 1.0, 5)


def test_paired_bootstrap_of_a_sure_improvement_has_the_smallest_p():
    out = paired_bootstrap([1] * 50, [0] * 50, n_resamples=999, seed=0)
    assert out.estimate == 1.0 and out.low == 1.0 and out.high == 1.0
    assert out.p_value == pytest.approx(2 / 1000)


def test_paired_bootstrap_interval_and_p_agree_on_significance():
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.6).astype(int)
    better = np.where(rng.random(400) < 0.12, 1, base)  # fixes about 5% of queries, breaks none
    same = np.where(rng.random(400) < 0.05, 1 - base, base)  # flips both ways
    strong = paired_bootstrap(better, base, n_resamples=4000, seed=0)
    weak = paired_bootstrap(same, base, n_resamples=4000, seed=0)
    assert strong.estimate == pytest.approx(float(np.mean(better - base)))
    assert strong.low > 0 and strong.p_value < 0.05
    assert weak.low < 0 < weak.high and weak.p_value > 0.05
    # The difference of paired means is the difference of the two recalls.
    assert strong.estimate == pytest.approx(better.mean() - base.mean())


def test_paired_bootstrap_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1, 0, 1], [1, 0])


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
    assert (pb.positive_first_n, pb.positive_first_wins) == (10, pytest.approx(0.8))
    assert (pb.positive_second_n, pb.positive_second_wins) == (4, pytest.approx(0.25))
    with pytest.raises(ValueError, match="no pairwise verdicts"):
        position_bias([], share)
