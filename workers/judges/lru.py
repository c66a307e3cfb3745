"""A least-recently-used map bounded by bytes: the worker's image-feature and prefix caches.

No torch here: the caller says what an entry weighs. An entry heavier than the whole bound is not
kept. ``hits`` and ``misses`` count lookups, for the benchmarks and ``inspect gpu``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: V) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        size = int(self._size_of(value))
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        self.shrink_to(self.max_bytes)

    def shrink_to(self, max_bytes: int) -> None:
        """Drop least recently used entries until at most ``max_bytes`` are held."""
        while self.bytes > max_bytes and self._items:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._items),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
