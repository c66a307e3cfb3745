"""What ``orchestrator calibrate`` reads of a finished run, and how it stores the run it derives.

Reads only: the parent's finished queries with their stage-1 candidates (its top K), the
positive's tile, its answered judgments and its rankings. Writes only new rows: the derived run,
its test queries (done), their rankings and its dev queries (``fit_queries``). Nothing of the
parent changes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from db.models import DerivedRun, FitQuery, Ranking, Run, RunQuery
from db.queries import now

FINISHED = text(
    "SELECT rq.query_id, q.name FROM run_queries rq JOIN queries q ON q.id = rq.query_id"
    " WHERE rq.run_id = :run_id AND rq.done_at IS NOT NULL ORDER BY q.name"
)
CANDIDATES = text(
    "SELECT c.query_id, c.rank, c.tile_id FROM runs r"
    " JOIN run_queries rq ON rq.run_id = r.id AND rq.done_at IS NOT NULL"
    " JOIN candidates c ON c.candidate_set_id = r.candidate_set_id AND c.query_id = rq.query_id AND c.rank <= r.k"
    " WHERE r.id = :run_id ORDER BY c.query_id, c.rank"
)
POSITIVES = text(
    "SELECT q.query_id, p.tile_id FROM run_query_ranks q"
    " JOIN positive_ranks p ON p.candidate_set_id = q.candidate_set_id AND p.query_id = q.query_id"
    " WHERE q.run_id = :run_id AND q.done = 1 AND q.stage1_rank IS NOT NULL"
)
SCORES = text(
    "SELECT query_id, tile_id, score FROM pointwise_scores"
    " WHERE run_id = :run_id AND status = 'done' AND score IS NOT NULL"
)
VERDICTS = text(
    "SELECT query_id, tile_first, tile_second, first_wins, p_first, p_second FROM pairwise_verdicts"
    " WHERE run_id = :run_id AND status = 'done'"
)
RANKINGS = text("SELECT query_id, rank, tile_id FROM rankings WHERE run_id = :run_id ORDER BY query_id, rank")


def finished_queries(s: Session, run_id: int) -> dict[int, str]:
    """query id -> query name, for the run's finished queries."""
    return {r.query_id: r.name for r in s.execute(FINISHED, {"run_id": run_id})}


def _orders(s: Session, stmt, run_id: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for r in s.execute(stmt, {"run_id": run_id}):
        out[r.query_id].append(r.tile_id)
    return dict(out)


def stage1_orders(s: Session, run_id: int) -> dict[int, list[int]]:
    """Per finished query: its candidates in stage-1 order, the run's top K."""
    return _orders(s, CANDIDATES, run_id)


def run_orders(s: Session, run_id: int) -> dict[int, list[int]]:
    """Per finished query: the run's own ranking."""
    return _orders(s, RANKINGS, run_id)


def positives(s: Session, run_id: int) -> dict[int, int]:
    """Per finished query whose positive is among the run's K candidates: the positive tile."""
    return {r.query_id: r.tile_id for r in s.execute(POSITIVES, {"run_id": run_id})}


def pointwise_scores(s: Session, run_id: int) -> list[Any]:
    return list(s.execute(SCORES, {"run_id": run_id}))


def pairwise_verdicts(s: Session, run_id: int) -> list[Any]:
    return list(s.execute(VERDICTS, {"run_id": run_id}))


def store_derived_run(
    s: Session,
    parent: Run,
    strategy: str,
    seed: int,
    params: Mapping[str, Any],
    orders: Mapping[int, Sequence[int]],
    dev_query_ids: Sequence[int],
) -> int:
    """A finished run reordering ``orders`` (test query id -> tiles), fitted on ``dev_query_ids``."""
    stamp = now()
    run = Run(
        candidate_set_id=parent.candidate_set_id,
        strategy=strategy,
        prompt_name=parent.prompt_name,
        prompt_sha256=parent.prompt_sha256,
        judge=parent.judge,
        model=parent.model,
        model_revision=parent.model_revision,
        queue=parent.queue,
        seed=seed,
        k=parent.k,
        n_queries=len(orders),
        batch_size=parent.batch_size,
        max_attempts=parent.max_attempts,
        params=dict(params),
        status="done",
        finished_at=stamp,
    )
    s.add(run)
    s.flush()
    s.add(DerivedRun(run_id=run.id, parent_run_id=parent.id, method=strategy))
    s.execute(insert(RunQuery), [{"run_id": run.id, "query_id": q, "done_at": stamp} for q in orders])
    s.execute(
        insert(Ranking),
        [
            {"run_id": run.id, "query_id": q, "rank": r, "tile_id": t}
            for q, order in orders.items()
            for r, t in enumerate(order, start=1)
        ],
    )
    s.execute(insert(FitQuery), [{"run_id": run.id, "query_id": q} for q in dev_query_ids])
    return run.id


def parent_of(s: Session, run_id: int) -> int | None:
    """The run ``run_id`` was derived from (None: not a derived run, or its parent was deleted)."""
    return s.scalar(select(DerivedRun.parent_run_id).where(DerivedRun.run_id == run_id))


def is_derived(s: Session, run_id: int) -> bool:
    return s.get(DerivedRun, run_id) is not None
