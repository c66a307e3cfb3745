"""Calibration's pure core: the dev/test split, fuse and gate, and the do-no-harm fit."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.calibrate import (
    MIN_QUERIES,
    CalibrateError,
    QueryEvidence,
    derive,
    fit,
    fuse_order,
    gate_order,
    split_queries,
    strengths,
)

K = 10


def _query(i: int, rng: random.Random, judge: str, kind: str) -> QueryEvidence:
    """A query whose positive sits at a random stage-1 rank (or is missing), and a judge that
    agrees with stage 1 ("stage1"), knows the truth ("oracle") or prefers anything but the truth
    ("harmful"), as pointwise scores or as a pairwise order with its comparisons."""
    tiles = tuple(range(i * 100, i * 100 + K))
    positive = tiles[min(int(rng.expovariate(0.7)), K - 1)] if rng.random() < 0.9 else None
    if judge == "stage1":
        order = tiles
    elif judge == "oracle":
        order = ((positive,) if positive is not None else ()) + tuple(t for t in tiles if t != positive)
    else:
        order = tuple(t for t in tiles if t != positive) + ((positive,) if positive is not None else ())
    if kind == "pointwise":
        scores = {t: 0.95 - 0.09 * r for r, t in enumerate(order)}
        return QueryEvidence(f"q{i:04d}.jpg", tiles, positive, scores=scores)
    place = {t: r for r, t in enumerate(order)}
    # Every pair once, in stage-1 order, as an all-pairs strategy asks them.
    comparisons = {(a, b): 0.9 if place[a] < place[b] else 0.1 for a, b in itertools.combinations(tiles, 2)}
    return QueryEvidence(f"q{i:04d}.jpg", tiles, positive, judge_order=order, comparisons=comparisons)


def _queries(n: int, judge: str, kind: str, seed: int = 0) -> list[QueryEvidence]:
    rng = random.Random(seed)
    return [_query(i, rng, judge, kind) for i in range(n)]


def _r1(queries, orders) -> float:
    by_name = {q.name: q for q in queries}
    return 100.0 * sum(1 for n, o in orders.items() if by_name[n].positive == o[0]) / len(orders)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=12), min_size=40, max_size=120, unique=True),
    share=st.floats(min_value=0.15, max_value=0.85),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_split_is_disjoint_complete_and_stable(names, share, seed):
    dev, test = split_queries(names, share, seed)
    assert set(dev).isdisjoint(test) and set(dev) | set(test) == set(names)
    assert len(dev) == round(share * len(names))
    shuffled = names[::-1] + names[:3]  # order and repeats do not matter: the split is by name
    assert split_queries(shuffled, share, seed) == (dev, test)
    assert split_queries(names, share, seed + 1) != (dev, test)  # another seed, another split


def test_split_refuses_too_few_queries_and_says_how_many():
    with pytest.raises(CalibrateError, match=r"at least 17 finished queries"):
        split_queries([f"q{i}" for i in range(12)], 0.3, 0)
    with pytest.raises(CalibrateError, match="within"):
        split_queries([f"q{i}" for i in range(100)], 1.0, 0)
    dev, test = split_queries([f"q{i}" for i in range(17)], 0.3, 0)
    assert len(dev) >= MIN_QUERIES and len(test) >= MIN_QUERIES


@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
@pytest.mark.parametrize("method", ["fuse", "gate"])
def test_a_judge_that_agrees_with_stage_1_changes_nothing(kind, method):
    queries = _queries(120, "stage1", kind)
    derived = derive(method, queries, 0.3, seed=1)
    by_name = {q.name: q for q in queries}
    assert all(order == by_name[n].tiles for n, order in derived.orders.items())


@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
@pytest.mark.parametrize("method", ["fuse", "gate"])
@pytest.mark.parametrize("seed", range(6))
def test_a_harmful_judge_is_switched_off_on_every_seed(kind, method, seed):
    queries = _queries(200, "harmful", kind, seed=seed)
    derived = derive(method, queries, 0.3, seed=seed)
    stage1 = {n: next(q for q in queries if q.name == n).tiles for n in derived.test}
    assert _r1(queries, derived.orders) >= _r1(queries, stage1) - 1.0
    assert derived.parameter == (0.0 if method == "fuse" else math.inf)


@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
@pytest.mark.parametrize("method", ["fuse", "gate"])
def test_a_judge_that_knows_the_truth_keeps_its_gain(kind, method):
    queries = _queries(200, "oracle", kind)
    derived = derive(method, queries, 0.3, seed=0)
    by_name = {q.name: q for q in queries}
    found = [n for n in derived.test if by_name[n].positive is not None]
    assert all(derived.orders[n][0] == by_name[n].positive for n in found)


def test_derive_is_reproducible_and_never_orders_a_dev_query():
    queries = _queries(150, "oracle", "pairwise")
    first, again = derive("fuse", queries, 0.3, 4), derive("fuse", list(reversed(queries)), 0.3, 4)
    assert first == again
    assert set(first.orders) == set(first.test) and set(first.test).isdisjoint(first.dev)


def test_fuse_weighs_stage_1_against_the_judge():
    q = QueryEvidence("q", (1, 2, 3), 3, scores={1: 0.2, 2: 0.5, 3: 0.9})
    s = strengths(q)
    assert fuse_order(q, 0.0, s) == (1, 2, 3)  # weight 0: stage 1
    assert fuse_order(q, 100.0, s) == (3, 2, 1)  # a large weight: the judge's order
    # -log(1) + w*logit(0.2) against -log(3) + w*logit(0.9): the judge wins once w > ~0.31.
    assert fuse_order(q, 0.2, s)[0] == 1 and fuse_order(q, 0.5, s)[0] == 3


def test_gate_moves_only_a_confident_favourite_and_needs_both_orders_to_agree():
    pointwise = QueryEvidence("q", (1, 2, 3), 2, scores={1: 0.4, 2: 0.8, 3: 0.1})
    # P(2 beats 1) = sigmoid(logit 0.8 - logit 0.4) = 0.857
    assert gate_order(pointwise, 0.8) == (2, 1, 3) and gate_order(pointwise, 0.9) == (1, 2, 3)
    assert gate_order(pointwise, math.inf) == (1, 2, 3)
    agree = QueryEvidence("q", (1, 2, 3), 2, judge_order=(2, 1, 3), comparisons={(1, 2): 0.1, (2, 1): 0.8})
    disagree = QueryEvidence("q", (1, 2, 3), 2, judge_order=(2, 1, 3), comparisons={(1, 2): 0.1, (2, 1): 0.3})
    assert gate_order(agree, 0.8) == (2, 1, 3)  # both orders say 2: mean P = 0.85
    assert gate_order(disagree, 0.5) == (1, 2, 3)  # shown second, 2 lost: no move


def test_a_failed_judgment_is_no_evidence():
    # Tile 3's score failed: it gets the query's median strength, not the worst or the best.
    q = QueryEvidence("q", (1, 2, 3, 4), None, scores={1: 0.1, 2: 0.9, 4: 0.5})
    s = strengths(q)
    assert s[3] == s[4] and s[1] < s[3] < s[2]


def test_fit_prefers_stage_1_unless_dev_shows_a_real_gain():
    # A judge right on only one more dev query than stage 1 is not worth the risk.
    queries = _queries(40, "stage1", "pointwise")
    lucky = queries[0]
    if lucky.positive is not None and lucky.tiles[0] != lucky.positive:
        scores = {t: (0.99 if t == lucky.positive else 0.01) for t in lucky.tiles}
        queries[0] = QueryEvidence(lucky.name, lucky.tiles, lucky.positive, scores=scores)
    assert fit("fuse", queries) == 0.0
    assert fit("gate", queries) == math.inf
