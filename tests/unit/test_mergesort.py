"""Merge sort and pointwise replays: pure functions over stored outcomes."""

from __future__ import annotations

import itertools
import random

import pytest

from orchestrator.strategies.base import Done, Need, UnknownStrategy
from orchestrator.strategies.mergesort import MergeSort, worst_case_comparisons
from orchestrator.strategies.pointwise import Pointwise
from orchestrator.strategies.registry import get_strategy


def drive(strategy, candidates, better):
    """Answer every Need with ``better(a, b)`` until Done; return (order, comparisons asked)."""
    outcomes: dict = {}
    asked = 0
    while True:
        step = strategy.replay(candidates, outcomes)
        if isinstance(step, Done):
            return list(step.order), asked
        assert step.items, "a Need must name at least one comparison"
        for a, b in step.items:
            assert (a, b) not in outcomes
            outcomes[(a, b)] = better(a, b)
            asked += 1


def test_sorts_by_a_consistent_judge_and_is_stable():
    rng = random.Random(0)
    for n in range(1, 25):
        quality = {c: rng.random() for c in range(n)}
        order, asked = drive(MergeSort(), list(range(n)), lambda a, b, q=quality: q[a] > q[b])
        assert order == sorted(range(n), key=lambda c: -quality[c])
        assert asked <= worst_case_comparisons(n)


def test_k20_needs_at_most_69_comparisons_and_reaches_the_bound():
    assert worst_case_comparisons(20) == 69
    worst = 0
    rng = random.Random(1)
    for _ in range(300):
        quality = {c: rng.random() for c in range(20)}
        _, asked = drive(MergeSort(), list(range(20)), lambda a, b, q=quality: q[a] > q[b])
        worst = max(worst, asked)
    assert 60 <= worst <= 69


def test_all_permutations_of_five_sort_correctly_within_the_bound():
    for perm in itertools.permutations(range(5)):
        order, asked = drive(MergeSort(), list(perm), lambda a, b: a < b)
        assert order == [0, 1, 2, 3, 4]
        assert asked <= worst_case_comparisons(5) == 8


def test_first_replay_exposes_one_comparison_per_independent_merge():
    step = MergeSort().replay(list(range(20)), {})
    assert isinstance(step, Need)
    # 20 -> 10 -> 5 -> (2 | 3): every 5-block has two leaf merges ready at once.
    assert len(step.items) == 8
    assert len(set(step.items)) == 8


def test_failed_comparison_read_as_first_wins_keeps_the_current_order():
    order, _ = drive(MergeSort(), list("abcdefg"), lambda a, b: True)
    assert order == list("abcdefg")


def test_replay_is_deterministic_over_a_partial_record():
    quality = {c: (c * 7919) % 23 for c in range(20)}
    outcomes = {}
    step = MergeSort().replay(list(range(20)), outcomes)
    for a, b in step.items[:3]:
        outcomes[(a, b)] = quality[a] > quality[b]
    assert MergeSort().replay(list(range(20)), dict(outcomes)) == MergeSort().replay(list(range(20)), dict(outcomes))


def test_pointwise_orders_by_score_then_stage1_rank_failed_last():
    p = Pointwise()
    assert p.replay([1, 2, 3], {1: 0.2}) == Need((2, 3))
    done = p.replay([1, 2, 3, 4, 5], {1: 0.2, 2: 0.9, 3: None, 4: 0.9, 5: 0.1})
    assert done == Done((2, 4, 1, 5, 3))


def test_unknown_strategy_suggests_a_name():
    with pytest.raises(UnknownStrategy, match="Did you mean 'pairwise'"):
        get_strategy("pairwse")
