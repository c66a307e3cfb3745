"""The reads and writes the coordinator and the workers share, as plain SQL over a session.

Judgment rows are created 'pending' by the coordinator (INSERT ... ON CONFLICT DO NOTHING on the
natural key), claimed by a worker (attempts + 1) and completed once (UPDATE guarded by
status = 'pending'): a redelivered message or a second worker changes nothing already stored.
Imports only ``db`` modules.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from db.models import (
    DONE,
    FAILED,
    PENDING,
    RUN_DONE,
    Candidate,
    CandidateSet,
    Dataset,
    GroundTruth,
    PairwiseVerdict,
    PointwiseScore,
    Query,
    Ranking,
    Run,
    RunQuery,
    Tile,
)
from db.upsert import insert_ignore

JUDGMENT_MODELS: dict[str, type[PairwiseVerdict] | type[PointwiseScore]] = {
    "pairwise": PairwiseVerdict,
    "pointwise": PointwiseScore,
}
# Keep IN lists well under SQLite's bound-parameter limit.
CHUNK = 900


def now() -> datetime:
    return datetime.now(UTC)


def chunked(seq: Sequence[Any], n: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# ----------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class RunInfo:
    id: int
    candidate_set_id: int
    dataset_id: int
    dataset_root: str
    strategy: str
    prompt_name: str
    prompt_sha256: str
    judge: str
    model: str
    model_revision: str
    queue: str
    seed: int
    k: int
    batch_size: int
    max_attempts: int
    params: Mapping[str, Any]
    status: str


def run_info(session: Session, run_id: int) -> RunInfo | None:
    row = session.execute(
        select(Run, CandidateSet.dataset_id, Dataset.root)
        .join(CandidateSet, CandidateSet.id == Run.candidate_set_id)
        .join(Dataset, Dataset.id == CandidateSet.dataset_id)
        .where(Run.id == run_id)
    ).first()
    if row is None:
        return None
    run, dataset_id, root = row
    params = dict(run.params or {})
    return RunInfo(
        id=run.id,
        candidate_set_id=run.candidate_set_id,
        dataset_id=dataset_id,
        dataset_root=root,
        strategy=run.strategy,
        prompt_name=run.prompt_name,
        prompt_sha256=run.prompt_sha256,
        judge=run.judge,
        model=run.model,
        model_revision=run.model_revision,
        queue=run.queue,
        seed=run.seed,
        k=run.k,
        batch_size=run.batch_size,
        max_attempts=run.max_attempts,
        params=params,
        status=run.status,
    )


def open_queries(session: Session, run_id: int, query_ids: Iterable[int] | None = None) -> list[int]:
    """Queries of the run whose ranking is not written yet."""
    stmt = select(RunQuery.query_id).where(RunQuery.run_id == run_id, RunQuery.done_at.is_(None))
    if query_ids is None:
        return sorted(session.scalars(stmt))
    wanted = sorted(set(query_ids))
    out: list[int] = []
    for part in chunked(wanted):
        out.extend(session.scalars(stmt.where(RunQuery.query_id.in_(part))))
    return sorted(out)


def finish_run_if_complete(session: Session, run_id: int) -> bool:
    """Mark the run done when every query has a ranking (guarded: once)."""
    left = session.scalar(
        select(func.count())
        .select_from(RunQuery)
        .where(RunQuery.run_id == run_id, RunQuery.done_at.is_(None))
    )
    if left:
        return False
    session.execute(
        update(Run).where(Run.id == run_id, Run.status != RUN_DONE).values(status=RUN_DONE, finished_at=now())
    )
    return True


# ----------------------------------------------------------------------------------------------
# candidates and outcomes (coordinator)


def candidate_lists(
    session: Session, candidate_set_id: int, query_ids: Sequence[int], k: int
) -> dict[int, list[int]]:
    """Stage-1 top-k tile ids per query, best first."""
    out: dict[int, list[int]] = defaultdict(list)
    for part in chunked(list(query_ids)):
        rows = session.execute(
            select(Candidate.query_id, Candidate.tile_id)
            .where(
                Candidate.candidate_set_id == candidate_set_id,
                Candidate.query_id.in_(part),
                Candidate.rank <= k,
            )
            .order_by(Candidate.query_id, Candidate.rank)
        )
        for q, t in rows:
            out[q].append(t)
    return dict(out)


@dataclass(frozen=True)
class StoredPair:
    status: str
    first_wins: bool | None
    p_first: float | None


@dataclass(frozen=True)
class StoredScore:
    status: str
    score: float | None


def pairwise_outcomes(
    session: Session, run_id: int, query_ids: Sequence[int]
) -> dict[int, dict[tuple[int, int], StoredPair]]:
    out: dict[int, dict[tuple[int, int], StoredPair]] = defaultdict(dict)
    t = PairwiseVerdict
    for part in chunked(list(query_ids)):
        rows = session.execute(
            select(t.query_id, t.tile_first, t.tile_second, t.status, t.first_wins, t.p_first).where(
                t.run_id == run_id, t.query_id.in_(part)
            )
        )
        for q, a, b, status, first_wins, p_first in rows:
            out[q][(a, b)] = StoredPair(status, first_wins, p_first)
    return out


def pointwise_outcomes(
    session: Session, run_id: int, query_ids: Sequence[int]
) -> dict[int, dict[int, StoredScore]]:
    out: dict[int, dict[int, StoredScore]] = defaultdict(dict)
    t = PointwiseScore
    for part in chunked(list(query_ids)):
        rows = session.execute(
            select(t.query_id, t.tile_id, t.status, t.score).where(t.run_id == run_id, t.query_id.in_(part))
        )
        for q, tile, status, score in rows:
            out[q][tile] = StoredScore(status, score)
    return out


def add_pending(session: Session, kind: str, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Create pending judgment rows; returns the ids of the rows that did not exist yet."""
    model = JUDGMENT_MODELS[kind]
    key = (
        ["run_id", "query_id", "tile_first", "tile_second"]
        if kind == "pairwise"
        else ["run_id", "query_id", "tile_id"]
    )
    return [r[0] for r in insert_ignore(session, model.__table__, rows, key=key, returning=["id"])]


def mark_enqueued(session: Session, kind: str, ids: Sequence[int]) -> None:
    model = JUDGMENT_MODELS[kind]
    stamp = now()
    for part in chunked(list(ids)):
        session.execute(update(model).where(model.id.in_(part)).values(enqueued_at=stamp))


def stale_pending(session: Session, run_id: int, kind: str, older_than: datetime | None) -> list[int]:
    """Pending rows never enqueued, or enqueued before ``older_than`` (None: every pending row)."""
    model = JUDGMENT_MODELS[kind]
    stmt = select(model.id).where(model.run_id == run_id, model.status == PENDING)
    if older_than is not None:
        stmt = stmt.where(or_(model.enqueued_at.is_(None), model.enqueued_at < older_than))
    return list(session.scalars(stmt.order_by(model.query_id, model.id)))


def write_rankings(session: Session, run_id: int, orders: Mapping[int, Sequence[int]]) -> None:
    """Store final orders (idempotent) and mark those queries done."""
    rows = [
        {"run_id": run_id, "query_id": q, "rank": i, "tile_id": t}
        for q, order in orders.items()
        for i, t in enumerate(order, start=1)
    ]
    insert_ignore(session, Ranking.__table__, rows, key=["run_id", "query_id", "rank"])
    stamp = now()
    for part in chunked(sorted(orders)):
        session.execute(
            update(RunQuery)
            .where(RunQuery.run_id == run_id, RunQuery.query_id.in_(part), RunQuery.done_at.is_(None))
            .values(done_at=stamp)
        )


# ----------------------------------------------------------------------------------------------
# judgments (workers)


@dataclass(frozen=True)
class JudgmentInput:
    """Everything a worker needs to ask one judgment (paths relative to the dataset root)."""

    id: int
    run_id: int
    query_id: int
    query_name: str
    query_path: str
    tile_ids: tuple[int, ...]
    tile_names: tuple[str, ...]
    tile_paths: tuple[str, ...]
    positive: tuple[bool, ...]
    stage1_rank: tuple[int, ...]
    attempts: int


def claim(session: Session, kind: str, ids: Sequence[int], worker: str) -> None:
    """Count one more attempt on pending rows (before the judge runs: a crash still counts)."""
    model = JUDGMENT_MODELS[kind]
    for part in chunked(list(ids)):
        session.execute(
            update(model)
            .where(model.id.in_(part), model.status == PENDING)
            .values(attempts=model.attempts + 1, worker=worker)
        )


def judgment_inputs(session: Session, kind: str, ids: Sequence[int]) -> list[JudgmentInput]:
    """Load the pending rows among ``ids`` with their images, positives and stage-1 ranks.

    One joined SELECT per chunk: a worker calls this for every batch, so round trips count.
    """
    model = JUDGMENT_MODELS[kind]
    tile_cols = [model.tile_first, model.tile_second] if kind == "pairwise" else [model.tile_id]
    tiles = [aliased(Tile) for _ in tile_cols]
    cands = [aliased(Candidate) for _ in tile_cols]
    candidate_set = bindparam("candidate_set")
    stmt = (
        select(
            model.id,
            model.run_id,
            model.query_id,
            model.attempts,
            Query.name,
            Query.path,
            GroundTruth.tile_id,
            *tile_cols,
            *(t.name for t in tiles),
            *(t.path for t in tiles),
            *(c.rank for c in cands),
        )
        .join(Query, Query.id == model.query_id)
        .outerjoin(
            GroundTruth, and_(GroundTruth.query_id == model.query_id, GroundTruth.relation == "positive")
        )
        .where(model.run_id == bindparam("run"))
    )
    for col, tile, cand in zip(tile_cols, tiles, cands, strict=True):
        # The candidate set is a bound value, not a join through runs: PostgreSQL then probes the
        # (candidate_set_id, query_id, tile_id) index per row even before tables are analysed.
        stmt = stmt.join(tile, tile.id == col).outerjoin(
            cand,
            and_(
                cand.candidate_set_id == candidate_set, cand.query_id == model.query_id, cand.tile_id == col
            ),
        )
    runs: dict[int, int] = {}
    for part in chunked(list(ids)):
        runs.update(
            session.execute(
                select(Run.id, Run.candidate_set_id).where(
                    Run.id.in_(select(model.run_id).where(model.id.in_(part)))
                )
            ).all()
        )
    n = len(tile_cols)
    out = []
    for (run_id, cs_id), part in ((r, p) for r in runs.items() for p in chunked(list(ids))):
        params = {"run": run_id, "candidate_set": cs_id}
        for r in session.execute(stmt.where(model.id.in_(part), model.status == PENDING), params):
            positive = r[6]
            tids = tuple(r[7 : 7 + n])
            out.append(
                JudgmentInput(
                    id=r[0],
                    run_id=r[1],
                    query_id=r[2],
                    query_name=r[4],
                    query_path=r[5],
                    tile_ids=tids,
                    tile_names=tuple(r[7 + n : 7 + 2 * n]),
                    tile_paths=tuple(r[7 + 2 * n : 7 + 3 * n]),
                    positive=tuple(positive == t for t in tids),
                    stage1_rank=tuple(10**6 if x is None else x for x in r[7 + 3 * n : 7 + 4 * n]),
                    attempts=r[3],
                )
            )
    return out


def record_outcomes(session: Session, kind: str, outcomes: Sequence[Mapping[str, Any]]) -> int:
    """Complete pending rows with their outcome; rows no longer pending are left untouched.

    Each outcome holds ``id``, ``status`` and the result columns of its table. Returns how many
    rows this call completed (a redelivered duplicate completes none).
    """
    if not outcomes:
        return 0
    model = JUDGMENT_MODELS[kind]
    result_cols = (["first_wins", "p_first", "p_second"] if kind == "pairwise" else ["score", "probs"]) + [
        "status",
        "raw_output",
        "error",
        "latency_ms",
        "worker",
        "model_revision",
    ]
    stamp = now()
    if session.get_bind().dialect.name == "postgresql":
        return _record_outcomes_pg(session, model.__tablename__, result_cols, outcomes, stamp)
    params = [{"b_id": o["id"], **{c: o.get(c) for c in result_cols}, "finished_at": stamp} for o in outcomes]
    stmt = (
        update(model.__table__)
        .where(and_(model.__table__.c.id == bindparam("b_id"), model.__table__.c.status == PENDING))
        .values({c: bindparam(c) for c in [*result_cols, "finished_at"]})
    )
    result = session.connection().execute(stmt, params)
    return result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(params)


_PG_ARRAY_TYPES = {
    "first_wins": "boolean[]",
    "p_first": "float8[]",
    "p_second": "float8[]",
    "score": "float8[]",
    "probs": "json[]",
    "status": "text[]",
    "raw_output": "text[]",
    "error": "text[]",
    "latency_ms": "float8[]",
    "worker": "text[]",
    "model_revision": "text[]",
}


def _record_outcomes_pg(
    session: Session, table: str, cols: list[str], outcomes: Sequence[Mapping[str, Any]], stamp: datetime
) -> int:
    """One UPDATE ... FROM unnest(arrays) for the whole batch.

    An executemany of per-row UPDATEs costs the server one statement per judgment and the client a
    parse of each; with arrays the SQL text is constant (cached) and the server does one hash join.
    """

    def column(c: str) -> list[Any]:
        if c == "probs":
            return [None if o.get(c) is None else json.dumps(o[c]) for o in outcomes]
        return [o.get(c) for o in outcomes]

    arrays = ", ".join(f"CAST(:{c} AS {_PG_ARRAY_TYPES[c]})" for c in cols)
    sets = ", ".join(f"{c} = d.{c}" for c in cols)
    sql = text(
        f"UPDATE {table} AS t SET {sets}, finished_at = :finished_at "
        f"FROM unnest(CAST(:ids AS integer[]), {arrays}) AS d(id, {', '.join(cols)}) "
        "WHERE t.id = d.id AND t.status = 'pending' RETURNING t.id"
    )
    params = {"ids": [o["id"] for o in outcomes], "finished_at": stamp, **{c: column(c) for c in cols}}
    return len(session.execute(sql, params).all())


def abandon(session: Session, kind: str, ids: Sequence[int], error: str) -> None:
    """Give up on rows whose attempts are spent: recorded as failed, never asked again."""
    model = JUDGMENT_MODELS[kind]
    for part in chunked(list(ids)):
        session.execute(
            update(model)
            .where(model.id.in_(part), model.status == PENDING)
            .values(status=FAILED, error=error, finished_at=now())
        )


__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "JudgmentInput",
    "RunInfo",
    "StoredPair",
    "StoredScore",
]
