"""What a worker needs to ask each judgment: the pending row, and its query's images and candidates.

The row comes from the database on every delivery (its status and attempts decide what to do).
The query's facts (image paths, positive, stage-1 ranks) never change once imported and each query
comes back to a worker round after round (a merge sort of 20 takes up to 35), so the worker reads
them once and keeps them: a bounded per-process cache, least recently used out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy.orm import Session

from db.queries import QueryFacts, RunInfo, pending_judgments, query_facts, run_info
from db.row_cache import ImmutableRowsCache
from db.settings import settings

UNRANKED = 10**6  # the stage-1 rank of a tile outside the candidate list
_NOT_A_CANDIDATE = (None, None, UNRANKED)  # (name, path, rank) of such a tile


class JudgmentInput(NamedTuple):
    """Everything a worker needs to ask one judgment (paths relative to the dataset root). A named
    tuple: one is built for every judgment, and a frozen dataclass costs several times as much.

    A name or path is None when the query or tile is not in the run's candidate set (rows the
    coordinator created always are): :meth:`problem` says so, and the judgment fails with it.
    """

    id: int
    run_id: int
    query_id: int
    query_name: str | None
    query_path: str | None
    tile_ids: tuple[int, ...]
    tile_names: tuple[str | None, ...]
    tile_paths: tuple[str | None, ...]
    positive: tuple[bool, ...]
    stage1_rank: tuple[int, ...]
    attempts: int
    leased_by: str | None = None  # the lease (db/leases.py) as read with the row
    lease_until: datetime | None = None

    @property
    def lease(self) -> tuple[int, int, str | None, datetime | None]:
        """(id, attempts, leased_by, lease_until): what ``db.leases.claim`` decides on."""
        return (self.id, self.attempts, self.leased_by, self.lease_until)

    def problem(self) -> str | None:
        if self.query_path is None:
            return f"query {self.query_id} has no candidates in the run's candidate set"
        missing = [t for t, p in zip(self.tile_ids, self.tile_paths, strict=True) if p is None]
        if missing:
            return f"tiles {missing} are not candidates of query {self.query_name} in the run's candidate set"
        return None


# (candidate set, query) -> the query's facts.
# Its bound (CVGL_WORKER_CACHE_QUERIES) is set on first use, not at import: a bad value is then
# reported by the command or task that reads the settings, not as an import traceback.
FACTS: ImmutableRowsCache[QueryFacts] = ImmutableRowsCache(query_facts, max_items=0)


def judgment_inputs(
    s: Session, kind: str, ids: Sequence[int], runs: dict[int, RunInfo | None]
) -> list[JudgmentInput]:
    """The pending rows among ``ids`` with what asking them needs. ``runs`` caches run_info by id
    (filled here for the runs met); rows of a run that no longer exists are left out."""
    rows = pending_judgments(
        s, kind, ids
    )  # (id, run_id, query_id, *tile ids, attempts, leased_by, lease_until)
    by_run: dict[int, list] = {}
    for row in rows:
        by_run.setdefault(row[1], []).append(row)
    if not FACTS.max_items:  # the first use in this process
        FACTS.max_items = settings().worker_cache_queries
    out = []
    for run_id, group in by_run.items():
        if run_id not in runs:
            runs[run_id] = run_info(s, run_id)
        info = runs[run_id]
        if info is None:
            continue
        facts = FACTS.get(s, info.candidate_set_id, [row[2] for row in group])
        for row in group:
            tile_ids = tuple(row[3:-3])
            lease = tuple(row[-3:])  # attempts, leased_by, lease_until
            f = facts.get(row[2])
            if f is None:
                n = len(tile_ids)
                out.append(
                    JudgmentInput(
                        row[0],
                        run_id,
                        row[2],
                        None,
                        None,
                        tile_ids,
                        (None,) * n,
                        (None,) * n,
                        (False,) * n,
                        (UNRANKED,) * n,
                        *lease,
                    )
                )
                continue
            tiles = [f.candidates.get(t, _NOT_A_CANDIDATE) for t in tile_ids]
            out.append(
                JudgmentInput(
                    row[0],
                    run_id,
                    row[2],
                    f.name,
                    f.path,
                    tile_ids,
                    tuple([t[0] for t in tiles]),
                    tuple([t[1] for t in tiles]),
                    tuple([f.positive == t for t in tile_ids]),
                    tuple([t[2] for t in tiles]),
                    *lease,
                )
            )
    return out
