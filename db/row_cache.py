"""A per-process cache of rows that never change once stored (candidate lists, a query's images).

The coordinator and the workers meet the same queries round after round (a merge sort of 20 takes
up to 35), so what was imported once is read once per process. Entries are keyed by database as
well (a process, a test run for one, may talk to several whose ids overlap), bounded, least
recently used out, and shared by the threads of a process. Imports only ``db`` modules.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from db.engine import database_of

V = TypeVar("V")


class ImmutableRowsCache(Generic[V]):
    """(database, scope, id) -> value, read by ``load(session, scope, missing ids)`` on a miss.

    ``load`` returns a value for each id it finds; an id it does not find is asked again next time.
    """

    def __init__(self, load: Callable[[Session, Hashable, list[int]], dict[int, V]], max_items: int) -> None:
        self.load = load
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, Hashable, int], V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, s: Session, scope: Hashable, ids: Sequence[int]) -> dict[int, V]:
        db = database_of(s)
        with self._lock:
            out = {i: v for i in ids if (v := self._items.get((db, scope, i))) is not None}
            for i in out:
                self._items.move_to_end((db, scope, i))
        missing = sorted({i for i in ids if i not in out})
        if missing:
            loaded = self.load(s, scope, missing)
            out.update(loaded)
            with self._lock:
                for i, v in loaded.items():
                    self._items[(db, scope, i)] = v
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._items)
