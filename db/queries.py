"""The reads and writes the coordinator and the workers share, as plain SQL over a session.

Judgment rows are created 'pending' by the coordinator (INSERT ... ON CONFLICT DO NOTHING on the
natural key), leased by a worker (``db/leases.py``: an attempt counted unless a live lease is
found) and completed once by the holder (UPDATE guarded by status = 'pending' and the lease): a
redelivered message or a second worker changes nothing already stored.
Imports only ``db`` modules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from db.models import (
    DONE,
    FAILED,
    PENDING,
    RUN_CANCELLED,
    RUN_DONE,
    RUN_RUNNING,
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
from db.upsert import insert_ignore, pg_int_array, pg_recordset, pg_rows

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


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def member_of(column: ColumnElement, name: str, pg: bool) -> ColumnElement[bool]:
    """``column IN :name`` for an integer column, the ids bound by :func:`id_parts`. On PostgreSQL
    ``= ANY`` of one ``integer[]`` parameter: the SQL text is the same for any number of ids, so
    psycopg and the server parse and plan it once, where a long IN list is rendered, parsed and
    planned anew on every call. Elsewhere an expanding IN list."""
    if not isinstance(column.type, Integer):
        raise TypeError(f"member_of takes integer columns, not {column} ({column.type})")
    if pg:
        # Untyped: the value (an IntArray) is typed integer[] by psycopg itself.
        return column == any_(bindparam(name))
    return column.in_(bindparam(name, expanding=True))


def id_parts(ids: Iterable[int], pg: bool) -> list[Any]:
    """Ids in parts for :func:`member_of`: one array literal on PostgreSQL, SQLite-sized lists elsewhere."""
    ids = list(ids)
    return [pg_int_array(ids)] if pg else [list(p) for p in chunked(ids)]


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
    """The run's settings, or None. Core, not ORM: the coordinator and the workers read it for
    every batch."""
    r, cs, d = Run.__table__, CandidateSet.__table__, Dataset.__table__
    fields = [f for f in RunInfo.__dataclass_fields__ if f not in ("dataset_id", "dataset_root")]
    row = (
        session.connection()
        .execute(
            select(*(r.c[f] for f in fields), cs.c.dataset_id, d.c.root)
            .select_from(r.join(cs, cs.c.id == r.c.candidate_set_id).join(d, d.c.id == cs.c.dataset_id))
            .where(r.c.id == run_id)
        )
        .first()
    )
    if row is None:
        return None
    values = dict(zip(fields, row[: len(fields)], strict=True))
    values["params"] = dict(values["params"] or {})
    return RunInfo(**values, dataset_id=row.dataset_id, dataset_root=row.root)


def open_queries(session: Session, run_id: int, query_ids: Iterable[int] | None = None) -> list[int]:
    """Queries of the run whose ranking is not written yet."""
    t = RunQuery.__table__
    stmt = select(t.c.query_id).where(t.c.run_id == run_id, t.c.done_at.is_(None))
    conn = session.connection()
    if query_ids is None:
        return sorted(conn.scalars(stmt))
    pg = is_postgres(session)
    stmt = stmt.where(member_of(t.c.query_id, "ids", pg))
    out: list[int] = []
    for part in id_parts(sorted(set(query_ids)), pg):
        out.extend(conn.scalars(stmt, {"ids": part}))
    return sorted(out)


def admitted_queries(session: Session, run_id: int, window: int, kind: str | None = None) -> list[int]:
    """With at most ``window`` queries open at once: the open queries let in now.

    Queries are let in in query id order, one for each that finished: those ranked below
    ``finished + window``. With ``kind``, only those with no judgment row yet (let in, never
    started), which the caller starts; without, all of them (a full replay).
    """
    rq = RunQuery.__table__
    finished = session.scalar(
        select(func.count()).select_from(rq).where(rq.c.run_id == run_id, rq.c.done_at.is_not(None))
    )
    first = (
        select(rq.c.query_id)
        .where(rq.c.run_id == run_id)
        .order_by(rq.c.query_id)
        .limit((finished or 0) + window)
    )
    stmt = select(rq.c.query_id).where(
        rq.c.run_id == run_id, rq.c.done_at.is_(None), rq.c.query_id.in_(first)
    )
    if kind is not None:
        j = JUDGMENT_MODELS[kind].__table__
        stmt = stmt.where(~select(j.c.id).where(j.c.run_id == run_id, j.c.query_id == rq.c.query_id).exists())
    return sorted(session.connection().scalars(stmt))


def candidate_sets(session: Session) -> list[CandidateSet]:
    """Every candidate set, by id."""
    return list(session.scalars(select(CandidateSet).order_by(CandidateSet.id)))


def candidate_set_named(session: Session, name: str) -> CandidateSet | None:
    return session.scalar(select(CandidateSet).where(CandidateSet.name == name))


def query_names(session: Session, candidate_set_id: int) -> dict[str, int]:
    """``query name -> id`` of the queries the candidate set ranks."""
    c = Candidate.__table__
    stmt = (
        select(Query.name, Query.id)
        .join(c, c.c.query_id == Query.id)
        .where(c.c.candidate_set_id == candidate_set_id, c.c.rank == 1)
    )
    return dict(session.execute(stmt).all())


def add_run_queries(session: Session, run_id: int, query_ids: Sequence[int]) -> None:
    insert_ignore(
        session, RunQuery.__table__, [{"run_id": run_id, "query_id": q} for q in query_ids], key=["run_id", "query_id"]
    )


def run_query_counts(session: Session, run_id: int) -> tuple[int, int]:
    """The run's queries, and how many of them are finished."""
    total, done = session.execute(
        select(func.count(), func.count(RunQuery.done_at)).where(RunQuery.run_id == run_id)
    ).one()
    return total, done


def run_judgment_counts(session: Session, run_id: int) -> dict[str, int]:
    """The run's judgments: ``pending``, ``done``, ``failed`` and ``reused`` (among the done: copied
    from an earlier run). One pass over each table's rows of the run."""
    counts = {"pending": 0, "done": 0, "failed": 0, "reused": 0}
    for model in JUDGMENT_MODELS.values():
        row = session.execute(
            select(
                *(func.count().filter(model.status == status) for status in (PENDING, DONE, FAILED)),
                func.count(model.reused_from_id),
            ).where(model.run_id == run_id)
        ).one()
        for name, n in zip(counts, row, strict=True):
            counts[name] += n or 0
    return counts


def run_is_running(session: Session, run_id: int) -> bool:
    """True while the run is neither done nor cancelled. On PostgreSQL the run's row is share-locked
    until the transaction ends, so a ``cancel_run`` waits for a replay that read it, and a replay
    that comes after the cancel sees it."""
    stmt = select(Run.status).where(Run.id == run_id)
    if is_postgres(session):
        stmt = stmt.with_for_update(read=True)
    return session.scalar(stmt) == RUN_RUNNING


def cancel_run(session: Session, run_id: int) -> tuple[str | None, int]:
    """Cancel a running run: its status becomes 'cancelled' and its pending judgments are closed as
    failed ("run cancelled"), so no worker takes them (a worker holding one stores nothing: results
    are stored only on pending rows). Returns the status the run had (None: no such run) and the
    judgments closed; only a 'running' run changes."""
    status = session.scalar(select(Run.status).where(Run.id == run_id).with_for_update())
    if status != RUN_RUNNING:
        return status, 0
    closed = 0
    at = now()
    session.execute(
        update(Run).where(Run.id == run_id, Run.status == RUN_RUNNING).values(status=RUN_CANCELLED, finished_at=at)
    )
    for model in JUDGMENT_MODELS.values():
        closed += session.execute(
            update(model)
            .where(model.run_id == run_id, model.status == PENDING)
            .values(status=FAILED, error=CANCELLED_ERROR, finished_at=at, lease_until=None)
        ).rowcount
    return status, closed


CANCELLED_ERROR = "run cancelled"


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
        update(Run).where(Run.id == run_id, Run.status == RUN_RUNNING).values(status=RUN_DONE, finished_at=now())
    )
    return True


# ----------------------------------------------------------------------------------------------
# candidates and outcomes (coordinator)


def candidate_lists(
    session: Session, candidate_set_id: int, query_ids: Sequence[int], k: int
) -> dict[int, list[int]]:
    """Stage-1 top-k tile ids per query, best first."""
    t = Candidate.__table__
    pg = is_postgres(session)
    stmt = (
        select(t.c.query_id, t.c.tile_id)
        .where(t.c.candidate_set_id == candidate_set_id, member_of(t.c.query_id, "ids", pg), t.c.rank <= k)
        .order_by(t.c.query_id, t.c.rank)
    )
    out: dict[int, list[int]] = defaultdict(list)
    conn = session.connection()
    for part in id_parts(query_ids, pg):
        for q, tile in conn.execute(stmt, {"ids": part}):
            out[q].append(tile)
    return dict(out)


# What names a judgment within its query, and what a worker stores as its result.
KEY_COLUMNS = {"pairwise": ("tile_first", "tile_second"), "pointwise": ("tile_id",)}
RESULT_COLUMNS = {"pairwise": ("first_wins", "p_first", "p_second"), "pointwise": ("score", "probs")}
# What a strategy reads of a finished judgment, after its key.
_OUTCOME_COLUMNS = {"pairwise": ("first_wins", "p_first"), "pointwise": ("score",)}


def _outcome_select(kind: str) -> Select:
    t = JUDGMENT_MODELS[kind].__table__
    cols = ["id", "query_id", *KEY_COLUMNS[kind], "status", *_OUTCOME_COLUMNS[kind]]
    return select(*(t.c[c] for c in cols))


def judgment_rows(session: Session, kind: str, run_id: int, query_ids: Sequence[int]) -> list[Row]:
    """Every judgment row of these queries, pending ones included: ``id``, ``query_id``, the key
    columns (``tile_first``, ``tile_second`` or ``tile_id``), ``status`` and what a strategy reads
    (``first_wins`` and ``p_first``, or ``score``)."""
    t = JUDGMENT_MODELS[kind].__table__
    pg = is_postgres(session)
    stmt = _outcome_select(kind).where(t.c.run_id == run_id, member_of(t.c.query_id, "ids", pg))
    conn = session.connection()
    return [r for part in id_parts(query_ids, pg) for r in conn.execute(stmt, {"ids": part}).all()]


def finished_rows(session: Session, kind: str, ids: Sequence[int]) -> list[Row]:
    """Those of the judgment rows ``ids`` that are no longer pending, as :func:`judgment_rows`."""
    t = JUDGMENT_MODELS[kind].__table__
    pg = is_postgres(session)
    stmt = _outcome_select(kind).where(member_of(t.c.id, "ids", pg), t.c.status != PENDING)
    conn = session.connection()
    return [r for part in id_parts(ids, pg) for r in conn.execute(stmt, {"ids": part}).all()]


def add_pending(session: Session, kind: str, rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """Create pending judgment rows. Returns ``(id, query_id, *key)`` of each row that did not
    exist yet (in no particular order); a row whose key existed already is left as it was.

    The rows are stamped ``enqueued_at`` here; the caller sends them right after the commit
    (``workers.dispatch.send_judgments``), and a send lost to a crash in between leaves rows with
    no task id, which ``db.work_items.stale_judgments`` finds like any other lost message.
    """
    key = ["run_id", "query_id", *KEY_COLUMNS[kind]]
    return insert_ignore(
        session,
        JUDGMENT_MODELS[kind].__table__,
        rows,
        key=key,
        returning=["id", "query_id", *KEY_COLUMNS[kind]],
        values={"enqueued_at": now()},
    )


def write_rankings(session: Session, run_id: int, orders: Mapping[int, Sequence[int]]) -> None:
    """Store final orders (idempotent) and mark those queries done."""
    rows = [
        {"query_id": q, "rank": i, "tile_id": t}
        for q, order in orders.items()
        for i, t in enumerate(order, 1)
    ]
    insert_ignore(
        session, Ranking.__table__, rows, key=["run_id", "query_id", "rank"], values={"run_id": run_id}
    )
    t = RunQuery.__table__
    pg = is_postgres(session)
    stmt = (
        update(t)
        .where(t.c.run_id == run_id, member_of(t.c.query_id, "ids", pg), t.c.done_at.is_(None))
        .values(done_at=now())
    )
    for part in id_parts(sorted(orders), pg):
        session.connection().execute(stmt, {"ids": part})


# ----------------------------------------------------------------------------------------------
# judgments (workers)


def pending_judgments(session: Session, kind: str, ids: Sequence[int]) -> list[Row]:
    """The rows among ``ids`` still pending: ``id``, ``run_id``, ``query_id``, the key columns
    (``tile_first``, ``tile_second`` or ``tile_id``), ``attempts``, ``leased_by``, ``lease_until``."""
    t = JUDGMENT_MODELS[kind].__table__
    pg = is_postgres(session)
    columns = ["id", "run_id", "query_id", *KEY_COLUMNS[kind], "attempts", "leased_by", "lease_until"]
    stmt = select(*(t.c[c] for c in columns)).where(member_of(t.c.id, "ids", pg), t.c.status == PENDING)
    conn = session.connection()
    return [r for part in id_parts(ids, pg) for r in conn.execute(stmt, {"ids": part}).all()]


@dataclass(frozen=True)
class QueryFacts:
    """A query's image, its positive tile and its candidates in one candidate set: what a worker
    needs besides the judgment row. None of it changes once imported."""

    name: str
    path: str
    positive: int | None
    candidates: Mapping[int, tuple[str, str, int]]  # tile id -> (name, path, stage-1 rank)


def query_facts(session: Session, candidate_set_id: int, query_ids: Sequence[int]) -> dict[int, QueryFacts]:
    """:class:`QueryFacts` of these queries in one SELECT (per SQLite-sized part)."""
    c, t, q, g = Candidate.__table__, Tile.__table__, Query.__table__, GroundTruth.__table__
    pg = is_postgres(session)
    stmt = (
        select(c.c.query_id, q.c.name, q.c.path, g.c.tile_id, c.c.tile_id, t.c.name, t.c.path, c.c.rank)
        .select_from(
            c.join(t, t.c.id == c.c.tile_id)
            .join(q, q.c.id == c.c.query_id)
            .outerjoin(g, and_(g.c.query_id == c.c.query_id, g.c.relation == "positive"))
        )
        .where(c.c.candidate_set_id == candidate_set_id, member_of(c.c.query_id, "ids", pg))
    )
    rows: dict[int, tuple] = {}
    tiles: dict[int, dict[int, tuple[str, str, int]]] = defaultdict(dict)
    conn = session.connection()
    for part in id_parts(query_ids, pg):
        for query_id, name, path, positive, tile_id, tile_name, tile_path, rank in conn.execute(
            stmt, {"ids": part}
        ):
            rows[query_id] = (name, path, positive)
            tiles[query_id][tile_id] = (tile_name, tile_path, rank)
    return {query_id: QueryFacts(*head, candidates=tiles[query_id]) for query_id, head in rows.items()}


def record_outcomes(
    session: Session,
    kind: str,
    outcomes: Sequence[Mapping[str, Any]],
    worker: str,
    model_revision: str | None,
    holder: str | None = None,
) -> int:
    """Complete pending rows with their outcome; rows no longer pending are left untouched.

    Each outcome holds ``id``, ``status`` and the result columns of its table; ``worker`` and
    ``model_revision`` are the batch's. With ``holder``, only rows whose lease that process holds
    (``db/leases.py``): a worker that froze and lost its lease stores nothing when it wakes. Returns
    how many rows this call completed (a redelivered duplicate completes none).
    """
    if not outcomes:
        return 0
    table = JUDGMENT_MODELS[kind].__table__
    per_row = [*RESULT_COLUMNS[kind], "status", "raw_output", "error", "latency_ms"]
    common = {"worker": worker, "model_revision": model_revision, "finished_at": now(), "lease_until": None}
    guard = table.c.status == PENDING
    if holder is not None:
        guard = and_(guard, table.c.leased_by == holder)
    if is_postgres(session):
        return _record_outcomes_pg(session, table, per_row, outcomes, common, holder)
    params = [{"b_id": o["id"], **{c: o.get(c) for c in per_row}} for o in outcomes]
    stmt = (
        update(table)
        .where(and_(table.c.id == bindparam("b_id"), guard))
        .values({**{c: bindparam(c) for c in per_row}, **common})
    )
    result = session.connection().execute(stmt, params)
    return result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(params)


def _record_outcomes_pg(
    session: Session,
    table: Table,
    cols: list[str],
    outcomes: Sequence[Mapping[str, Any]],
    common: Mapping[str, Any],
    holder: str | None,
) -> int:
    """One UPDATE ... FROM json_populate_recordset for the whole batch (see ``db/upsert.py``).

    An executemany of per-row UPDATEs costs the server one statement per judgment and the client a
    parse of each; with one recordset the SQL text is constant and the server does one hash join.
    """
    sets = ", ".join([*(f"{c} = d.{c}" for c in cols), *(f"{c} = :{c}" for c in common)])
    lease = " AND t.leased_by = :holder" if holder is not None else ""
    sql = text(
        f"UPDATE {table.name} AS t SET {sets} FROM {pg_recordset(table)} "
        f"WHERE t.id = d.id AND t.status = 'pending'{lease} RETURNING t.id"
    )
    # A column an outcome leaves out reads as NULL, as it should (a failed judgment has no result).
    params = {"rows": pg_rows(outcomes), **common, **({"holder": holder} if holder is not None else {})}
    return len(session.execute(sql, params).all())


__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "QueryFacts",
    "RunInfo",
]
