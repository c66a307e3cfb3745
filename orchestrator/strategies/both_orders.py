"""Both-order debiasing: every comparison asked as (a, b) and (b, a), the two answers combined.

A judge that prefers a position moves probability to whichever tile it is shown first. Asking
both orders and averaging P(a wins) over them, ``(P(a first wins) + 1 - P(b first wins)) / 2``,
cancels any such shift: with ``P(first) <- B + (1 - B) * p`` in both orders the combined value is
``B / 2 + (1 - B) * p``, which is above 0.5 exactly when ``p`` is. A tie (0.5) goes to the item
the inner strategy showed first, so failures keep its order.

``BothOrders`` wraps any pairwise strategy: the inner strategy still names one comparison
(a, b); the wrapper asks for whichever of (a, b) and (b, a) is not stored, and hands the inner
strategy the combined outcome once both are. A failed judgment reads as 0.5 (no preference),
so the other order decides alone. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from orchestrator.strategies.base import Done, Need

Pair = tuple[Hashable, Hashable]


def combined(p_ab: float, p_ba: float) -> float:
    """P(a wins) from P(first wins) with a shown first (``p_ab``) and with b shown first (``p_ba``)."""
    return (p_ab + 1.0 - p_ba) / 2.0


class BothOrders:
    kind = "pairwise"
    reads_probabilities = True  # it needs P(first wins) of each order to combine them

    def __init__(self, inner: Any) -> None:
        if inner.kind != "pairwise":
            raise ValueError(f"both orders applies to pairwise strategies, not {inner.name!r}")
        self.inner = inner
        self.name = inner.name

    def judgments_per_query(self, n: int) -> int:
        return 2 * self.inner.judgments_per_query(n)

    def replay(self, candidates: Sequence[Hashable], outcomes: Mapping[Pair, float]) -> Done | Need:
        """Args:
            candidates: items in stage-1 order, distinct.
            outcomes: (shown first, shown second) -> P(the first-shown item wins), per stored order.

        Returns:
            The inner strategy's Done, or Need with both orders of each comparison it names,
            less the orders already stored (each pair's two orders adjacent, so they share a batch).
        """
        wants_p = getattr(self.inner, "reads_probabilities", False)
        merged: dict[Pair, bool | float] = {}
        for (a, b), p_ab in outcomes.items():
            p_ba = outcomes.get((b, a))
            if p_ba is None:
                continue
            p = combined(p_ab, p_ba)
            merged[(a, b)] = p if wants_p else p >= 0.5
        step = self.inner.replay(candidates, merged)
        if isinstance(step, Done):
            return step
        asked: dict[Pair, None] = {}
        for a, b in step.items:
            for pair in ((a, b), (b, a)):
                if pair not in outcomes:
                    asked[pair] = None
        return Need(tuple(asked))
