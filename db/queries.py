"""The reads and writes the coordinator and the workers share, as plain SQL over a session.

Judgment rows are created 'pending' by the coordinator (INSERT ... ON CONFLICT DO NOTHING on the
natural key), claimed by a worker (attempts + 1) and completed once (UPDATE guarded by
status = 'pending'): a redelivered message or a second worker changes nothing already stored.
Imports only ``db`` modules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

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


def attempts_of(session: Session, kind: str, ids: Sequence[int]) -> dict[int, int]:
    """Attempts so far of the still-pending rows among ``ids``."""
    model = JUDGMENT_MODELS[kind]
    out: dict[int, int] = {}
    for part in chunked(list(ids)):
        out.update(
            session.execute(
                select(model.id, model.attempts).where(model.id.in_(part), model.status == PENDING)
            ).all()
        )
    return out


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
    """Load the pending rows among ``ids`` with their images, positives and stage-1 ranks."""
    model = JUDGMENT_MODELS[kind]
    rows = []
    for part in chunked(list(ids)):
        if kind == "pairwise":
            cols = (
                model.id,
                model.run_id,
                model.query_id,
                model.tile_first,
                model.tile_second,
                model.attempts,
            )
        else:
            cols = (model.id, model.run_id, model.query_id, model.tile_id, model.attempts)
        rows.extend(session.execute(select(*cols).where(model.id.in_(part), model.status == PENDING)).all())
    if not rows:
        return []
    query_ids = sorted({r.query_id for r in rows})
    run_ids = sorted({r.run_id for r in rows})
    tile_ids = sorted({t for r in rows for t in (r[3:-1])})
    queries = {
        q.id: q
        for part in chunked(query_ids)
        for q in session.scalars(select(Query).where(Query.id.in_(part)))
    }
    tiles = {
        t.id: t for part in chunked(tile_ids) for t in session.scalars(select(Tile).where(Tile.id.in_(part)))
    }
    positives: dict[int, int] = {}
    for part in chunked(query_ids):
        positives.update(
            session.execute(
                select(GroundTruth.query_id, GroundTruth.tile_id).where(
                    GroundTruth.query_id.in_(part), GroundTruth.relation == "positive"
                )
            ).all()
        )
    cand_set = dict(session.execute(select(Run.id, Run.candidate_set_id).where(Run.id.in_(run_ids))).all())
    ranks: dict[tuple[int, int, int], int] = {}
    for cs in set(cand_set.values()):
        for part in chunked(query_ids):
            for q, t, rank in session.execute(
                select(Candidate.query_id, Candidate.tile_id, Candidate.rank).where(
                    Candidate.candidate_set_id == cs, Candidate.query_id.in_(part)
                )
            ):
                ranks[(cs, q, t)] = rank
    out = []
    for r in rows:
        tids = tuple(r[3:-1])
        q = queries[r.query_id]
        cs = cand_set[r.run_id]
        out.append(
            JudgmentInput(
                id=r.id,
                run_id=r.run_id,
                query_id=r.query_id,
                query_name=q.name,
                query_path=q.path,
                tile_ids=tids,
                tile_names=tuple(tiles[t].name for t in tids),
                tile_paths=tuple(tiles[t].path for t in tids),
                positive=tuple(positives.get(r.query_id) == t for t in tids),
                stage1_rank=tuple(ranks.get((cs, r.query_id, t), 10**6) for t in tids),
                attempts=r.attempts,
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
    params = [{"b_id": o["id"], **{c: o.get(c) for c in result_cols}, "finished_at": stamp} for o in outcomes]
    stmt = (
        update(model.__table__)
        .where(and_(model.__table__.c.id == bindparam("b_id"), model.__table__.c.status == PENDING))
        .values({c: bindparam(c) for c in [*result_cols, "finished_at"]})
    )
    result = session.connection().execute(stmt, params)
    return result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(params)


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
