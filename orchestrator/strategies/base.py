"""What a strategy replay returns, and the registry of strategies.

A strategy is a pure function of the candidates (stage-1 order) and the outcomes stored so far.
It returns ``Done(order)`` or ``Need(items)``: every judgment it can name now (for a pairwise
strategy, ordered pairs (shown first, shown second); for a pointwise one, tiles). No I/O, clock
or randomness: replaying after any crash gives the same answer.
"""

from __future__ import annotations

import difflib
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


class UnknownStrategy(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _registry() -> dict[str, type]:
    from orchestrator.strategies.mergesort import MergeSort
    from orchestrator.strategies.pointwise import Pointwise

    return {"pairwise": MergeSort, "mergesort": MergeSort, "pointwise": Pointwise}


STRATEGY_NAMES = ("pairwise", "mergesort", "pointwise")


def get_strategy(name: str, **options: Any) -> Strategy:
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownStrategy(f"Unknown strategy {name!r}.{hint} Known strategies: {', '.join(registry)}")
    return registry[name](**options)
