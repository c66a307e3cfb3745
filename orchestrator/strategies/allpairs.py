"""All pairs: every pair compared once, in one round, aggregated into a full order.

Each unordered pair is asked once with the better stage-1 rank shown first: n(n-1)/2 comparisons
(190 for K = 20), every one of them named by the first replay, so a query needs one round. With
``both_orders`` (``BothOrders``) each is asked in both orders and the two answers combined.

Aggregation (``aggregate``):
- ``copeland`` (default): an item's score is the number of comparisons it won (P >= 0.5 for the
  first shown: a tie or a failure goes to the first shown, the better stage-1 rank).
- ``bradley-terry``: strengths fitted to the judge's probabilities as soft wins (a comparison
  at P = 0.7 gives 0.7 of a win and 0.3 of a loss), by Newton's method on log-strengths. Each item also
  plays half a win and half a loss against a fixed item of strength 1, a weak prior that keeps
  the fit finite when an item wins everything. With hard 0/1 outcomes in a complete round-robin
  the fit orders as Copeland does (wins are its sufficient statistic); the probabilities are what
  it adds.
Ties in score go to the better stage-1 rank. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from orchestrator.strategies.base import Done, Need, StrategyOptionError

AGGREGATES = ("copeland", "bradley-terry")
# Bradley-Terry fit: stop when no log-strength moves by more than this, or after BT_MAX_ITER steps.
BT_TOLERANCE = 1e-10
BT_MAX_ITER = 100
BT_PRIOR_GAMES = 1.0  # half a win and half a loss against a virtual item of strength 1
# Scores equal to this many decimals count as tied (float noise must not outrank stage 1).
SCORE_DECIMALS = 9


class AllPairs:
    name = "allpairs"
    kind = "pairwise"
    OPTIONS = ("aggregate",)
    reads_probabilities = True

    def __init__(self, aggregate: str = "copeland") -> None:
        if aggregate not in AGGREGATES:
            raise StrategyOptionError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.aggregate = aggregate

    def judgments_per_query(self, n: int) -> int:
        return n * (n - 1) // 2

    def replay(
        self, candidates: Sequence[Hashable], outcomes: Mapping[tuple[Hashable, Hashable], float]
    ) -> Done | Need:
        """Args:
            candidates: items in stage-1 order (best first), distinct.
            outcomes: (shown first, shown second) -> P(the first-shown item wins).

        Returns:
            Done with the aggregated order, or Need with every pair not stored yet.
        """
        items = list(candidates)
        pairs = [(a, b) for i, a in enumerate(items) for b in items[i + 1 :]]
        missing = tuple(p for p in pairs if p not in outcomes)
        if missing:
            return Need(missing)
        probs = {p: float(outcomes[p]) for p in pairs}
        if self.aggregate == "copeland":
            score = copeland_scores(items, probs)
        else:
            score = bradley_terry(items, probs)
        rank = {c: i for i, c in enumerate(items)}
        return Done(tuple(sorted(items, key=lambda c: (-round(score[c], SCORE_DECIMALS), rank[c]))))


def copeland_scores(items: Sequence[Hashable], probs: Mapping[tuple[Hashable, Hashable], float]) -> dict:
    """Comparisons won per item; P(first wins) >= 0.5 is a win for the first shown."""
    wins = dict.fromkeys(items, 0.0)
    for (a, b), p in probs.items():
        wins[a if p >= 0.5 else b] += 1.0
    return wins


def bradley_terry(items: Sequence[Hashable], probs: Mapping[tuple[Hashable, Hashable], float]) -> dict:
    """Bradley-Terry log-strengths from soft outcomes, with the weak prior above (virtual item at 0).

    Newton's method on the log-likelihood, which the prior makes strictly concave (one maximum);
    a step that does not raise the likelihood is halved.
    """
    index = {c: i for i, c in enumerate(items)}
    n = len(items)
    won = np.zeros((n, n))  # won[i, j]: soft wins of i over j
    for (a, b), p in probs.items():
        p = min(1.0, max(0.0, float(p)))
        won[index[a], index[b]] += p
        won[index[b], index[a]] += 1.0 - p
    games = won + won.T
    theta = np.zeros(n)
    value = _bt_log_likelihood(theta, won)
    for _ in range(BT_MAX_ITER):
        p = _sigmoid(theta[:, None] - theta[None, :])
        p0 = _sigmoid(theta)
        grad = (won - games * p).sum(axis=1) + BT_PRIOR_GAMES * (0.5 - p0)
        curv = games * p * (1.0 - p)
        hess = curv - np.diag(curv.sum(axis=1) + BT_PRIOR_GAMES * p0 * (1.0 - p0))
        step = np.linalg.solve(hess, -grad)
        scale = 1.0
        while True:
            candidate = theta + scale * step
            new_value = _bt_log_likelihood(candidate, won)
            if new_value >= value - 1e-15 or scale < 1e-6:
                break
            scale /= 2.0
        moved = float(np.max(np.abs(candidate - theta)))
        theta, value = candidate, new_value
        if moved < BT_TOLERANCE:
            break
    return {c: float(theta[index[c]]) for c in items}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _bt_log_likelihood(theta: np.ndarray, won: np.ndarray) -> float:
    diff = theta[:, None] - theta[None, :]
    prior = BT_PRIOR_GAMES * 0.5 * (-np.logaddexp(0.0, -theta) - np.logaddexp(0.0, theta))
    return float(-(won * np.logaddexp(0.0, -diff)).sum() + prior.sum())
