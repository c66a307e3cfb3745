"""The strategy contract: what a replay returns, the errors, and how a pairwise one reads outcomes.

A strategy is a pure function of the candidates (stage-1 order) and the outcomes stored so far.
It returns ``Done(order)`` or ``Need(items)``: every judgment it can name now (for a pairwise
strategy, ordered pairs (shown first, shown second); for a pointwise one, tiles). No I/O, clock
or randomness: replaying after any crash gives the same answer.

A pairwise strategy reads ``(first, second) -> True when the first-shown item wins``, or, when it
sets ``reads_probabilities``, ``(first, second) -> P(first-shown item wins)``. A failed
comparison reads as "first wins" (True, or 0.5 with ties going to the first shown), so it keeps
the order the strategy showed. ``both_orders=True`` wraps any pairwise strategy in
``BothOrders`` (``both_orders.py``). The name -> strategy table is ``registry.py``; nothing in
this package imports it, so the strategies never import in a circle.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Done:
    order: tuple[Hashable, ...]


@dataclass(frozen=True)
class Need:
    items: tuple[Any, ...]


class Strategy(Protocol):
    name: str
    kind: str  # 'pairwise' (outcomes: (first, second) -> first wins) or 'pointwise' (tile -> score)

    def replay(self, candidates: Sequence[Any], outcomes: Mapping[Any, Any]) -> Done | Need: ...

    def judgments_per_query(self, n: int) -> int:
        """Judgments a query of ``n`` candidates needs at most (what a progress bar counts to)."""
        ...


class UnknownStrategy(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class StrategyOptionError(ValueError):
    """An option the strategy does not take, or a value it cannot use."""


# A failed pairwise judgment carries no preference: 0.5, and a tie goes to the first shown.
FAILED_P_FIRST = 0.5


def pairwise_value(
    failed: bool, first_wins: bool | None, p_first: float | None, *, probabilities: bool
) -> bool | float:
    """What a pairwise strategy reads for one stored judgment (see the module docstring).

    Args:
        failed: the judgment was recorded failed.
        first_wins: the stored verdict (None when failed).
        p_first: the stored P(first shown wins), or None (a judge that only generates text).
        probabilities: the strategy reads probabilities rather than verdicts.
    """
    if not probabilities:
        return True if failed else bool(first_wins)
    if failed:
        return FAILED_P_FIRST
    if p_first is None:
        return 1.0 if first_wins else 0.0
    return float(p_first)
