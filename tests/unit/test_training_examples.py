"""Pairwise training examples: hard negatives, orders, the validation split, the data position."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.training.examples import (
    QueryLabels,
    batch_indices,
    hard_negatives,
    pair_examples,
    split_queries,
    steps_for,
)


def labels(qid: int) -> QueryLabels:
    # Positive 10, semi-positives 11-13; stage-1 order puts a semi-positive and the positive on top.
    return QueryLabels(qid, f"q{qid}", 10, frozenset({11, 12, 13}), (11, 10, 20, 12, 21, 22, 13, 23))


def test_hard_negatives_are_the_best_ranked_candidates_that_are_neither_positive_nor_semi_positive():
    assert hard_negatives(labels(1), 3) == [20, 21, 22]
    assert hard_negatives(labels(1), 10) == [20, 21, 22, 23]


def test_both_orders_show_every_pair_twice_with_the_answer_following_the_positive():
    out = pair_examples([labels(1), labels(2)], negatives=2, both_orders=True, seed=0)
    assert len(out) == 2 * 2 * 2
    for e in out:
        assert (e.first == 10) == (e.answer == 0) and (e.second == 10) == (e.answer == 1)
        assert {e.first, e.second} - {10} <= {20, 21}
    assert Counter(e.answer for e in out) == {0: 4, 1: 4}


def test_one_order_is_seeded_and_balanced_over_many_pairs():
    many = [labels(q) for q in range(200)]
    a = pair_examples(many, negatives=3, both_orders=False, seed=5)
    assert a == pair_examples(many, negatives=3, both_orders=False, seed=5)
    assert a != pair_examples(many, negatives=3, both_orders=False, seed=6)
    assert len(a) == 600 and 240 < sum(e.answer for e in a) < 360


def test_the_validation_split_is_disjoint_seeded_by_name_and_never_empty():
    names = {f"pano{i}": i for i in range(40)}
    train, val = split_queries(names, 0.1, seed=0)
    assert len(val) == 4 and not set(train) & set(val) and set(train) | set(val) == set(range(40))
    assert split_queries(dict(reversed(names.items())), 0.1, seed=0) == (train, val)  # by name, not order
    assert split_queries(names, 0.1, seed=1)[1] != val
    assert len(split_queries(names, 0.001, seed=0)[1]) == 1  # a positive share holds at least one out
    assert split_queries(names, 0.0, seed=0) == (sorted(names.values()), [])
    with pytest.raises(ValueError, match="--val-share"):
        split_queries(names, 1.0, seed=0)


def test_each_epoch_is_a_permutation_and_a_step_names_its_examples():
    n, b = 10, 4
    seen = [i for step in range(5) for i in batch_indices(n, b, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new order each epoch
    # The examples of a step depend on the step alone: what a resumed job relies on.
    assert batch_indices(n, b, 3, seed=3) == seen[12:16]
    assert batch_indices(n, b, 3, seed=4) != seen[12:16]


def test_steps_are_given_or_follow_from_epochs():
    assert steps_for(100, 8, steps=7, epochs=None) == 7
    assert steps_for(100, 8, steps=None, epochs=None) == 12  # one epoch
    assert steps_for(100, 8, steps=None, epochs=2.5) == 31
    assert steps_for(3, 8, steps=None, epochs=1) == 1
