"""Merge sort as a pure replay over stored pairwise outcomes (the paper's pairwise reranking).

Top-down merge sort of the stage-1 order: at most 69 comparisons for K = 20 (K log K order).
In a merge the element of the left run is shown first, so a failed comparison, read as "first
wins", keeps the current order, as the paper's code keeps the incumbent. Independent merges
(every sub-sort still waiting) each name their next comparison, so one replay exposes several.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from orchestrator.strategies.base import Done, Need


class MergeSort:
    name = "mergesort"
    kind = "pairwise"

    def judgments_per_query(self, n: int) -> int:
        return worst_case_comparisons(n)

    def replay(
        self, candidates: Sequence[Hashable], outcomes: Mapping[tuple[Hashable, Hashable], bool]
    ) -> Done | Need:
        """Args:
            candidates: items in stage-1 order (best first), distinct.
            outcomes: (shown first, shown second) -> True when the first-shown item is better.

        Returns:
            Done with the full order, or Need with the next comparison of every unfinished merge.
        """
        needs: list[tuple[Hashable, Hashable]] = []
        order = _sort(list(candidates), outcomes, needs)
        return Done(tuple(order)) if order is not None else Need(tuple(needs))


def _sort(items: list, outcomes: Mapping, needs: list) -> list | None:
    if len(items) <= 1:
        return items
    mid = len(items) // 2
    left = _sort(items[:mid], outcomes, needs)
    right = _sort(items[mid:], outcomes, needs)
    if left is None or right is None:
        return None
    merged = []
    i = j = 0
    n_left, n_right = len(left), len(right)
    while i < n_left and j < n_right:
        pair = (left[i], right[j])
        first_wins = outcomes.get(pair)  # one lookup: the coordinator replays this every round
        if first_wins is None:
            needs.append(pair)
            return None
        if first_wins:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    return merged + left[i:] + right[j:]


def worst_case_comparisons(n: int) -> int:
    """Comparisons top-down merge sort needs at most for n items (69 for n = 20)."""
    if n <= 1:
        return 0
    return worst_case_comparisons(n // 2) + worst_case_comparisons(n - n // 2) + n - 1
