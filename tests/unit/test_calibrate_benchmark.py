"""The calibration aims of benchmarks/strategies.py: when each applies, passes and by how much it misses."""

from benchmarks.strategies import aim_margin, aim_verdict


def test_harmful_applies_only_where_the_parent_loses_20_points():
    assert aim_margin("harmful", {1: 60.0, 5: 80.0}, {1: 45.0, 5: 70.0}, {1: 50.0, 5: 80.0}) is None
    margin = aim_margin("harmful", {1: 60.0, 5: 80.0}, {1: 40.0, 5: 70.0}, {1: 58.5, 5: 80.0})
    assert margin == -0.5
    assert aim_verdict("harmful", margin) == "MISS: missed by 0.5 points"
    assert aim_verdict("harmful", aim_margin("harmful", {1: 60.0}, {1: 1.0}, {1: 59.0})) == "PASS (+0.0)"


def test_consistent_keeps_90_percent_of_the_gain_at_both_k():
    base, parent = {1: 60.0, 5: 80.0}, {1: 90.0, 5: 90.0}
    assert aim_margin("consistent", base, parent, {1: 87.0, 5: 89.0}) == 0.0
    assert aim_margin("consistent", base, parent, {1: 90.0, 5: 88.0}) == -1.0  # R@5 needs 89
    assert aim_margin("consistent", base, {1: 55.0, 5: 80.0}, base) is None  # no gain to keep


def test_noisy_needs_the_better_run_and_pointwise_must_be_above():
    base, parent = {1: 60.0, 5: 80.0}, {1: 58.0, 5: 88.0}
    assert aim_verdict("noisy", aim_margin("noisy", base, parent, {1: 60.0, 5: 80.0})) == "PASS (+0.0)"
    assert aim_verdict("pointwise", aim_margin("pointwise", base, parent, {1: 60.0, 5: 80.0})).startswith(
        "MISS"
    )
    assert (
        aim_verdict("pointwise", aim_margin("pointwise", base, parent, {1: 61.2, 5: 80.0})) == "PASS (+1.2)"
    )
