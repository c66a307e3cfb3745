"""Pointwise reranking as a pure replay: order by stored score, ties by stage-1 rank.

Every candidate is needed at once (one round). A failed judgment (None) ranks below every scored
candidate, keeping stage-1 order among the failed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from orchestrator.strategies.base import Done, Need


class Pointwise:
    name = "pointwise"
    kind = "pointwise"

    def judgments_per_query(self, n: int) -> int:
        return n

    def replay(
        self, candidates: Sequence[Hashable], outcomes: Mapping[Hashable, float | None]
    ) -> Done | Need:
        missing = tuple(c for c in candidates if c not in outcomes)
        if missing:
            return Need(missing)
        rank = {c: i for i, c in enumerate(candidates)}

        def key(c: Hashable) -> tuple[int, float, int]:
            score = outcomes[c]
            return (1, 0.0, rank[c]) if score is None else (0, -score, rank[c])

        return Done(tuple(sorted(candidates, key=key)))
