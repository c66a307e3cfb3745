"""Repeated best-of-rest for the top k, as the paper's public code (geo_ranker) ranks pairwise.

For position i = 0 .. top-1 the incumbent starts as the item at i; every later item challenges it
in list order, shown second (the incumbent is always shown first), and takes its place when it
wins. The winner is then swapped into position i, exactly as the code does, so the swap decides
the order in which later rounds meet their challengers. Cost: (n-1) + (n-2) + ... + (n-top)
comparisons, 19 + 18 + 17 = 54 for the top 3 of 20, one at a time (each depends on the last).

The tail: the code stores only the top k; its list past k is scrambled by the swaps. Here the
order is the k winners, then every other candidate in stage-1 order. A failed comparison reads as
"first wins" and keeps the incumbent, as the code does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from orchestrator.strategies.base import Done, Need, StrategyOptionError

DEFAULT_TOP = 3  # geo_ranker's --pairwise_top_k default


def check_top(top: object) -> int:
    if type(top) is not int or top < 1:
        raise StrategyOptionError(f"top must be a positive integer, got {top!r}")
    return top


class Selection:
    name = "selection"
    kind = "pairwise"
    OPTIONS = ("top",)

    def __init__(self, top: int = DEFAULT_TOP) -> None:
        self.top = check_top(top)

    def judgments_per_query(self, n: int) -> int:
        return selection_comparisons(n, self.top)

    def replay(
        self, candidates: Sequence[Hashable], outcomes: Mapping[tuple[Hashable, Hashable], bool]
    ) -> Done | Need:
        """Args:
            candidates: items in stage-1 order (best first), distinct.
            outcomes: (incumbent, challenger) -> True when the incumbent wins.

        Returns:
            Done with the top k then the rest in stage-1 order, or Need with the one next comparison.
        """
        items = list(candidates)
        for i in range(min(self.top, len(items))):
            best = i
            for j in range(i + 1, len(items)):
                pair = (items[best], items[j])
                if pair not in outcomes:
                    return Need((pair,))
                if not outcomes[pair]:
                    best = j
            items[i], items[best] = items[best], items[i]
        head = items[: self.top]
        chosen = set(head)
        return Done(tuple(head) + tuple(c for c in candidates if c not in chosen))


def selection_comparisons(n: int, top: int) -> int:
    """Comparisons repeated best-of-rest makes for the top ``top`` of n (54 for 3 of 20)."""
    return sum(n - 1 - i for i in range(min(top, n)))
