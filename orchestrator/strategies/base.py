"""What a strategy replay returns, and the registry of strategies.

A strategy is a pure function of the candidates (stage-1 order) and the outcomes stored so far.
It returns ``Done(order)`` or ``Need(items)``: every judgment it can name now (for a pairwise
strategy, ordered pairs (shown first, shown second); for a pointwise one, tiles). No I/O, clock
or randomness: replaying after any crash gives the same answer.

A pairwise strategy reads ``(first, second) -> True when the first-shown item wins``, or, when it
sets ``reads_probabilities``, ``(first, second) -> P(first-shown item wins)``. A failed
comparison reads as "first wins" (True, or 0.5 with ties going to the first shown), so it keeps
the order the strategy showed. ``both_orders=True`` wraps any pairwise strategy in
``BothOrders`` (``both_orders.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from workers.names import did_you_mean


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


def _registry() -> dict[str, type]:
    from orchestrator.strategies.allpairs import AllPairs
    from orchestrator.strategies.mergesort import MergeSort
    from orchestrator.strategies.pointwise import Pointwise
    from orchestrator.strategies.selection import Selection
    from orchestrator.strategies.tournament import Tournament

    return {
        "pairwise": MergeSort,
        "mergesort": MergeSort,
        "selection": Selection,
        "tournament": Tournament,
        "allpairs": AllPairs,
        "pointwise": Pointwise,
    }


STRATEGY_NAMES = ("pairwise", "mergesort", "selection", "tournament", "allpairs", "pointwise")


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy ``name`` with its options; ``both_orders=True`` wraps a pairwise one.

    Raises:
        UnknownStrategy: no strategy of that name.
        StrategyOptionError: an option the strategy does not take, or a bad value.
    """
    registry = _registry()
    if name not in registry:
        raise UnknownStrategy(
            f"Unknown strategy {name!r}.{did_you_mean(name, registry)} Known strategies: {', '.join(registry)}"
        )
    cls = registry[name]
    options = dict(options)
    both_orders = options.pop("both_orders", False)
    if not isinstance(both_orders, bool):
        raise StrategyOptionError(f"both_orders must be true or false, got {both_orders!r}")
    takes = getattr(cls, "OPTIONS", ())
    for option in options:
        if option not in takes:
            also = f" (it takes: {', '.join(takes)})" if takes else ""
            raise StrategyOptionError(f"strategy {name!r} takes no option {option!r}{also}")
    strategy = cls(**options)
    if both_orders:
        if strategy.kind != "pairwise":
            raise StrategyOptionError(f"both_orders applies to pairwise strategies, not {name!r}")
        from orchestrator.strategies.both_orders import BothOrders

        strategy = BothOrders(strategy)
    return strategy
