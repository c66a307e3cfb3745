"""What a coordinator process keeps between replays: candidate lists and stored judgments.

A merge sort of 20 candidates takes up to 35 rounds per query, and every round replays the query
from what is stored. Re-reading all of a query's judgments each round cost the coordinator about
20 row reads per judgment stored. This cache keeps, per (run, query), the outcomes read so far and
the ids of the rows still pending; a round re-reads only those pending rows.

It holds committed facts only, and a judgment row changes once, from pending to done or failed,
so what it holds is a subset of the database:

- every row it believes pending is re-read before each replay (:meth:`JudgmentCache.view`);
- a row it does not know (inserted by another coordinator process, or by ``resume``) can only make
  a replay ask for a judgment that exists already; the insert then conflicts, and the coordinator
  reads that query in full and replays it again (:meth:`JudgmentCache.reload`).

So each replay decides what a full read would, and any number of coordinator processes stay
correct. Both caches are bounded (least recently used out) and shared by the threads of a process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from db.engine import database_of
from db.models import FAILED, PENDING
from db.queries import candidate_lists, finished_rows, judgment_rows
from db.row_cache import ImmutableRowsCache
from db.settings import settings
from orchestrator.strategies.base import pairwise_value

# Stage-1 top-k tile ids per (candidate set, k) and query: candidate lists never change.
CANDIDATES: ImmutableRowsCache[list[int]] = ImmutableRowsCache(
    lambda s, scope, query_ids: candidate_lists(s, scope[0], query_ids, scope[1]), max_items=100_000
)


def cached_candidate_lists(
    s: Session, candidate_set_id: int, query_ids: Sequence[int], k: int
) -> dict[int, list[int]]:
    """Stage-1 top-k tile ids per query, read once per process."""
    return CANDIDATES.get(s, (candidate_set_id, k), query_ids)


@dataclass
class QueryJudgments:
    """One query's stored judgments as this process last read them."""

    outcomes: dict[Hashable, Any] = field(default_factory=dict)  # key -> what the strategy reads
    pending: dict[Hashable, int] = field(default_factory=dict)  # key -> row id, pending when read

    def __contains__(self, key: Hashable) -> bool:
        """A row exists for this judgment (pending or finished)."""
        return key in self.outcomes or key in self.pending


def outcome_reader(kind: str, probabilities: bool) -> Callable[[Row], tuple[Hashable, Any]]:
    """Turns a row of ``judgment_rows`` into (key, what the strategy reads)."""
    if kind == "pairwise":
        # A failed comparison counts as "first wins": the order shown (current order) is kept.
        return lambda r: (
            (r.tile_first, r.tile_second),
            pairwise_value(r.status == FAILED, r.first_wins, r.p_first, probabilities=probabilities),
        )
    return lambda r: (r.tile_id, None if r.status == FAILED else r.score)


def _key(kind: str, row: Row | tuple) -> Hashable:
    """The judgment key of an ``(id, query_id, *key)`` row."""
    return (row[2], row[3]) if kind == "pairwise" else row[2]


# (database, run id): which run a cache entry belongs to.
RunKey = tuple[str, int]


def run_key(s: Session, run_id: int) -> RunKey:
    return (database_of(s), run_id)


class JudgmentCache:
    """Per (run, query): the outcomes and pending row ids this process has read or written."""

    def __init__(self, max_queries: int | None = None) -> None:
        self._max_queries = max_queries
        self._states: OrderedDict[tuple[RunKey, int], QueryJudgments] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def max_queries(self) -> int:
        """Queries whose judgments this process keeps (about 10 kB each at most, for K=20): the
        given bound, else ``CVGL_COORDINATOR_CACHE_QUERIES``, read when first needed, not at import.
        A run with more queries open at once still runs correctly, re-reading what falls out."""
        if self._max_queries is None:
            self._max_queries = settings().coordinator_cache_queries
        return self._max_queries

    def view(
        self, s: Session, run: RunKey, kind: str, probabilities: bool, query_ids: Sequence[int]
    ) -> dict[int, QueryJudgments]:
        """The queries' judgments as stored now: cached ones with their pending rows re-read,
        the others read in full."""
        with self._lock:
            cached = {q: st for q in query_ids if (st := self._states.get((run, q))) is not None}
            for q in cached:
                self._states.move_to_end((run, q))
            waiting = {row_id: st for st in cached.values() for row_id in st.pending.values()}
        if waiting:
            read = outcome_reader(kind, probabilities)
            finished = [(waiting[row.id], *read(row)) for row in finished_rows(s, kind, list(waiting))]
            with self._lock:
                for st, key, value in finished:
                    st.outcomes[key] = value
                    st.pending.pop(key, None)
        missing = [q for q in query_ids if q not in cached]
        return {**cached, **self.reload(s, run, kind, probabilities, missing)}

    def reload(
        self, s: Session, run: RunKey, kind: str, probabilities: bool, query_ids: Sequence[int]
    ) -> dict[int, QueryJudgments]:
        """Read these queries' judgments in full and keep them."""
        if not query_ids:
            return {}
        loaded = {q: QueryJudgments() for q in query_ids}
        read = outcome_reader(kind, probabilities)
        for row in judgment_rows(s, kind, run[1], query_ids):
            st = loaded[row.query_id]
            if row.status == PENDING:
                st.pending[_key(kind, row)] = row.id
            else:
                key, value = read(row)
                st.outcomes[key] = value
        with self._lock:
            for q, st in loaded.items():
                self._states[(run, q)] = st
                self._states.move_to_end((run, q))
            limit = self.max_queries
            while len(self._states) > limit:
                self._states.popitem(last=False)
        return loaded

    def add_pending(self, run: RunKey, kind: str, rows: Iterable[tuple]) -> None:
        """Rows ``(id, query_id, *key)`` this process inserted pending (call after the commit)."""
        with self._lock:
            for row in rows:
                st = self._states.get((run, row[1]))
                key = _key(kind, row)
                if st is not None and key not in st.outcomes:
                    st.pending.setdefault(key, row[0])

    def forget(self, run: RunKey, query_ids: Iterable[int]) -> None:
        with self._lock:
            for q in query_ids:
                self._states.pop((run, q), None)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def __len__(self) -> int:
        return len(self._states)


JUDGMENTS = JudgmentCache()
