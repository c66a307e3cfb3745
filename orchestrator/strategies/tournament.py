"""Exact ordered top-k by a knockout tree that reuses earlier matches (tournament selection).

The bracket is a fixed balanced binary tree over the stage-1 order (halves split as merge sort
splits them), so its depth is ceil(log2 n). Its n - 1 matches give the winner. To find the next
best, the winner's leaf is emptied and only the matches on its path to the root are replayed:
its sibling moves up without a match, and every match above is asked only if that pair never
met (two items always meet at the same node, shown in the same order, so a replayed match is a
stored one). Each further place therefore costs at most ceil(log2 n) - 1 new comparisons:

    comparisons <= n - 1 + (k - 1) * (ceil(log2 n) - 1)    (35 for the top 5 of 20; merge sort: 69)

which is within the looser n - 1 + (k - 1) * ceil(log2 n). Every match whose two sides are known is
named at once, so the first place takes ceil(log2 n) rounds and each further place at most
ceil(log2 n) - 1.

In a match the item with the better stage-1 rank is shown first; a failed comparison reads as
"first wins", so failures keep stage-1 order. The order returned is the top k, then the rest in
stage-1 order. With a consistent judge the top k is exactly the true top k, in order.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

from orchestrator.strategies.base import Done, Need
from orchestrator.strategies.selection import check_top

DEFAULT_TOP = 5  # the paper reports Recall@1, @3 and @5

_EMPTY = object()  # a subtree whose items are all placed already
_OPEN = object()  # a subtree whose winner waits on a comparison not yet stored


class Tournament:
    name = "tournament"
    kind = "pairwise"
    OPTIONS = ("top",)

    def __init__(self, top: int = DEFAULT_TOP) -> None:
        self.top = check_top(top)

    def judgments_per_query(self, n: int) -> int:
        return tournament_bound(n, self.top)

    def replay(
        self, candidates: Sequence[Hashable], outcomes: Mapping[tuple[Hashable, Hashable], bool]
    ) -> Done | Need:
        """Args:
            candidates: items in stage-1 order (best first), distinct.
            outcomes: (shown first, shown second) -> True when the first-shown item wins.

        Returns:
            Done with the top k then the rest in stage-1 order, or Need with every match that can
            be played now.
        """
        items = list(candidates)
        rank = {c: i for i, c in enumerate(items)}
        placed: list[Hashable] = []
        for _ in range(min(self.top, len(items))):
            needs: list[tuple[Hashable, Hashable]] = []
            winner = _winner(items, set(placed), rank, outcomes, needs)
            if winner is _OPEN:
                return Need(tuple(dict.fromkeys(needs)))
            placed.append(winner)
        chosen = set(placed)
        return Done(tuple(placed) + tuple(c for c in items if c not in chosen))


def _winner(
    items: list, placed: set, rank: Mapping, outcomes: Mapping, needs: list[tuple[Hashable, Hashable]]
) -> object:
    """The winner of the bracket over ``items``, _EMPTY, or _OPEN (its missing matches go to ``needs``)."""
    if len(items) == 1:
        return _EMPTY if items[0] in placed else items[0]
    mid = len(items) // 2
    left = _winner(items[:mid], placed, rank, outcomes, needs)
    right = _winner(items[mid:], placed, rank, outcomes, needs)
    if left is _OPEN or right is _OPEN:
        return _OPEN
    if left is _EMPTY:
        return right
    if right is _EMPTY:
        return left
    first, second = (left, right) if rank[left] < rank[right] else (right, left)
    pair = (first, second)
    if pair not in outcomes:
        needs.append(pair)
        return _OPEN
    return first if outcomes[pair] else second


def tournament_bound(n: int, top: int) -> int:
    """At most this many comparisons for the ordered top ``top`` of n (35 for 5 of 20)."""
    if n <= 1:
        return 0
    return n - 1 + (min(top, n) - 1) * (math.ceil(math.log2(n)) - 1)
