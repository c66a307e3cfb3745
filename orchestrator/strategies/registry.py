"""The name -> strategy table and the lookup that builds a strategy with its options.

Only callers outside this package import this module: the strategies import ``base`` alone, so the
package's import graph has no circle (tests/unit/test_strategies.py checks it).
"""

from __future__ import annotations

from typing import Any

from orchestrator.strategies.allpairs import AllPairs
from orchestrator.strategies.base import Strategy, StrategyOptionError, UnknownStrategy
from orchestrator.strategies.both_orders import BothOrders
from orchestrator.strategies.mergesort import MergeSort
from orchestrator.strategies.pointwise import Pointwise
from orchestrator.strategies.selection import Selection
from orchestrator.strategies.tournament import Tournament
from workers.names import did_you_mean

STRATEGIES: dict[str, type] = {
    "pairwise": MergeSort,
    "mergesort": MergeSort,
    "selection": Selection,
    "tournament": Tournament,
    "allpairs": AllPairs,
    "pointwise": Pointwise,
}

STRATEGY_NAMES = tuple(STRATEGIES)


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy ``name`` with its options; ``both_orders=True`` wraps a pairwise one.

    Raises:
        UnknownStrategy: no strategy of that name (one line, with a did-you-mean suggestion).
        StrategyOptionError: an option the strategy does not take, or a bad value.
    """
    if name not in STRATEGIES:
        raise UnknownStrategy(
            f"Unknown strategy {name!r}.{did_you_mean(name, STRATEGIES)} Known strategies: {', '.join(STRATEGIES)}"
        )
    cls = STRATEGIES[name]
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
        strategy = BothOrders(strategy)
    return strategy
