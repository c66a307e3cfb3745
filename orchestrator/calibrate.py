"""Do no harm: derive a reranking from a finished run's stored judgments and the stage-1 order,
fitted on a seeded share of the queries (dev) and applied to the rest (test). Pure functions.

- ``fuse``: one score per candidate, ``-log(stage-1 rank) + weight * judge strength``, where the
  judge strength is the logit of the pointwise score (as a probability) or, for pairwise runs,
  ``-log(rank)`` in the order the run's strategy built from its comparisons (the same scale as
  stage 1). Weight 0 is stage 1; a large weight is the judge's order with stage 1 breaking ties.
- ``gate``: keep the stage-1 order and move the judge's favourite to first place only when the
  judge is confident it beats stage 1's first: P(favourite beats it) >= threshold, from the stored
  comparisons of the two when there are any (then every order asked must agree), else from a
  Bradley-Terry fit to all the query's stored P(first) (both orders where asked), or for pointwise
  runs from the two scores. A threshold of infinity is stage 1.

The weight (threshold) is chosen on the dev queries from a fixed grid, for the best R@1, then R@5,
then the choice closest to stage 1; 0 (never) is on the grid, so a judge that only hurts on dev
is switched off. A failed judgment is no evidence: a tile without a score gets the query's median
strength, a failed comparison is left out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median

from orchestrator.reporting.stats import PairedDifference, paired_difference
from orchestrator.strategies.allpairs import bradley_terry
from workers.names import did_you_mean

METHODS = ("fuse", "gate")
FUSE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
GATE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, math.inf)  # inf: never move
PROBABILITY_CLIP = 1e-4  # a pointwise score of exactly 0 or 1 must still have a finite logit
MIN_QUERIES = 5  # in each of dev and test


class CalibrateError(ValueError):
    pass


@dataclass(frozen=True)
class QueryEvidence:
    """One query of a finished run: what calibration may read, by tile id.

    ``tiles``: the run's candidates in stage-1 order (its top K). ``positive``: the positive tile
    if among them (only the dev queries' positives are read by the fit). ``scores``: pointwise
    scores mapped to [0, 1]. Pairwise runs: ``judge_order``, the run's own ranking, and
    ``comparisons``, (first shown, second shown) -> P(first wins).
    """

    name: str
    tiles: tuple[int, ...]
    positive: int | None = None
    scores: Mapping[int, float] = field(default_factory=dict)
    judge_order: tuple[int, ...] = ()
    comparisons: Mapping[tuple[int, int], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Derived:
    method: str
    parameter: float  # the fitted weight (fuse) or threshold (gate)
    dev: tuple[str, ...]  # query names the parameter was fitted on
    test: tuple[str, ...]  # query names the derived run is reported on
    orders: dict[str, tuple[int, ...]]  # test query name -> derived order


def split_queries(names: Sequence[str], dev_share: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded dev share of the queries, chosen by name (the same names give the same split in any
    database and in any order); returns (dev, test), disjoint, both sorted."""
    if not 0.0 < dev_share < 1.0:
        raise CalibrateError(f"the dev share must be within (0, 1), got {dev_share}")
    unique = sorted(set(names))
    n_dev = round(dev_share * len(unique))
    needed = math.ceil(MIN_QUERIES / min(dev_share, 1.0 - dev_share))
    if n_dev < MIN_QUERIES or len(unique) - n_dev < MIN_QUERIES:
        raise CalibrateError(
            f"{len(unique)} finished queries are too few for a dev share of {dev_share}: dev and test need "
            f"{MIN_QUERIES} queries each, so at least {needed} finished queries"
        )
    ranked = sorted(unique, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    dev = set(ranked[:n_dev])
    return sorted(dev), [n for n in unique if n not in dev]


def strengths(q: QueryEvidence) -> dict[int, float]:
    """The judge's evidence per tile (see the module docstring); larger is better."""
    if q.judge_order:
        rank = {t: r for r, t in enumerate(q.judge_order, start=1)}
        return {t: -math.log(rank[t]) if t in rank else -math.log(len(q.tiles) + 1) for t in q.tiles}
    if q.comparisons:  # a pairwise run without a stored order (none finished): its comparisons
        return bradley_terry(q.tiles, q.comparisons)
    logits = {t: _logit(p) for t, p in q.scores.items() if t in q.tiles}
    neutral = median(logits.values()) if logits else 0.0
    return {t: logits.get(t, neutral) for t in q.tiles}


def fuse_order(
    q: QueryEvidence, weight: float, strength: Mapping[int, float] | None = None
) -> tuple[int, ...]:
    s = strength if strength is not None else strengths(q)
    if weight == 0.0:
        return q.tiles
    score = {t: -math.log(r) + weight * s[t] for r, t in enumerate(q.tiles, start=1)}
    rank = {t: r for r, t in enumerate(q.tiles)}
    return tuple(sorted(q.tiles, key=lambda t: (-round(score[t], 9), rank[t])))


def gate_order(
    q: QueryEvidence, threshold: float, strength: Mapping[int, float] | None = None
) -> tuple[int, ...]:
    return gate_with(q, threshold, gate_candidate(q, strength if strength is not None else strengths(q)))


def gate_candidate(q: QueryEvidence, strength: Mapping[int, float]) -> tuple[int | None, float]:
    """The judge's favourite and P(it beats stage 1's first); (None, 0) when they are the same."""
    if not q.tiles:
        return None, 0.0
    rank = {t: r for r, t in enumerate(q.tiles)}
    favourite = min(q.tiles, key=lambda t: (-round(strength[t], 9), rank[t]))
    if favourite == q.tiles[0]:
        return None, 0.0
    return favourite, confidence(q, favourite, q.tiles[0], strength)


def gate_with(q: QueryEvidence, threshold: float, candidate: tuple[int | None, float]) -> tuple[int, ...]:
    favourite, p = candidate
    if favourite is None or math.isinf(threshold) or p < threshold:
        return q.tiles
    return (favourite, *(t for t in q.tiles if t != favourite))


def confidence(q: QueryEvidence, a: int, b: int, strength: Mapping[int, float]) -> float:
    """P(``a`` is the better tile than ``b``): from their own comparisons when stored (0 unless
    every order asked agrees ``a`` wins), else from a Bradley-Terry fit to the query's
    comparisons, else (pointwise) from the strengths."""
    direct = [p for (x, y), p in q.comparisons.items() if (x, y) == (a, b)]
    direct += [1.0 - p for (x, y), p in q.comparisons.items() if (x, y) == (b, a)]
    if direct:
        return sum(direct) / len(direct) if all(p > 0.5 for p in direct) else 0.0
    fitted = bradley_terry(q.tiles, q.comparisons) if q.comparisons else strength
    return 1.0 / (1.0 + math.exp(-(fitted[a] - fitted[b])))


ORDERS = {"fuse": fuse_order, "gate": gate_order}
GRIDS = {"fuse": FUSE_WEIGHTS, "gate": GATE_THRESHOLDS}
STAGE1 = {"fuse": 0.0, "gate": math.inf}  # the grid value that leaves stage 1 as it is
KEEP_P = 0.1  # a fitted value must beat stage 1 on dev at this level, or stage 1 is kept


def fit(method: str, dev: Sequence[QueryEvidence]) -> float:
    """The grid value with the best dev R@1, then R@5, then the one closest to stage 1, kept only if
    it beats stage 1's R@1 on dev beyond chance (exact McNemar p < ``KEEP_P``); failing that, the
    value with the best dev R@5 among those that change no dev query's R@1, if it beats stage 1's
    R@5 beyond chance; else stage 1's own value."""
    check_method(method)
    grid = GRIDS[method]
    cache = [strengths(q) for q in dev]
    if method == "fuse":
        orders = {v: [fuse_order(q, v, s) for q, s in zip(dev, cache, strict=True)] for v in grid}
    else:  # the favourite and its confidence do not depend on the threshold: once per query
        candidates = [gate_candidate(q, s) for q, s in zip(dev, cache, strict=True)]
        orders = {v: [gate_with(q, v, c) for q, c in zip(dev, candidates, strict=True)] for v in grid}
    closeness = (lambda v: -v) if method == "fuse" else (lambda v: v)  # fuse: small weight; gate: high bar

    def objective(value: float) -> tuple[int, int, float]:
        return (
            sum(_top_hits(dev, orders[value], 1)),
            sum(_top_hits(dev, orders[value], 5)),
            closeness(value),
        )

    stage1 = STAGE1[method]

    def against_stage1(value: float, k: int) -> PairedDifference:
        return paired_difference(_top_hits(dev, orders[value], k), _top_hits(dev, orders[stage1], k))

    def beats_stage1(d: PairedDifference) -> bool:
        return d.only_a > d.only_b and d.p_value < KEEP_P

    best = max(grid, key=objective)
    if beats_stage1(against_stage1(best, 1)):
        return best
    # No R@1 gain to show: the value that changes no dev query's R@1 and gains most at R@5.
    same_top1 = [v for v in grid if (d := against_stage1(v, 1)).only_a == d.only_b == 0]
    safe = max(same_top1, key=objective)
    return safe if beats_stage1(against_stage1(safe, 5)) else stage1


def derive(method: str, queries: Sequence[QueryEvidence], dev_share: float, seed: int) -> Derived:
    """Split, fit on dev, order the test queries; reproducible from the same inputs and seed."""
    check_method(method)
    dev_names, test_names = split_queries([q.name for q in queries], dev_share, seed)
    by_name = {q.name: q for q in queries}
    parameter = fit(method, [by_name[n] for n in dev_names])
    orders = {n: ORDERS[method](by_name[n], parameter) for n in test_names}
    return Derived(method, parameter, tuple(dev_names), tuple(test_names), orders)


def check_method(method: str) -> None:
    if method not in METHODS:
        hint = did_you_mean(method, METHODS)
        raise CalibrateError(f"unknown method {method!r}.{hint} Known methods: {', '.join(METHODS)}")


def _logit(p: float) -> float:
    p = min(1.0 - PROBABILITY_CLIP, max(PROBABILITY_CLIP, float(p)))
    return math.log(p / (1.0 - p))


def _top_hits(queries: Sequence[QueryEvidence], orders: Sequence[Sequence[int]], k: int) -> list[int]:
    """Per query 0/1: is its positive within the first k of its order?"""
    return [int(q.positive is not None and q.positive in o[:k]) for q, o in zip(queries, orders, strict=True)]
