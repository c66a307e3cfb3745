"""The SQL that reports read: Recall@k per run and for the stage-1 baseline.

The views ``run_query_ranks``, ``run_recall`` and ``candidate_set_recall`` are created by
migration 0002; a psql user can select from them directly. R@k counts the positive only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

RECALL_KS = (1, 3, 5, 10)


def _recall_sql(rank_col: str) -> str:
    return ", ".join(
        f"CAST(100.0 * AVG(CASE WHEN {rank_col} <= {k} THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION) AS recall_at_{k}"
        for k in RECALL_KS
    )


RUN_RECALL = text(
    "SELECT rr.*, cs.name AS candidates FROM run_recall rr JOIN candidate_sets cs ON cs.id = rr.candidate_set_id"
    " WHERE rr.run_id IN :run_ids ORDER BY rr.run_id"
).bindparams(bindparam("run_ids", expanding=True))

CANDIDATE_SET_RECALL = text(
    "SELECT * FROM candidate_set_recall WHERE candidate_set_id IN :ids ORDER BY candidate_set_id"
).bindparams(bindparam("ids", expanding=True))

# Stage-1 order on exactly the queries the given runs reranked (their union per candidate set).
BASELINE_ON_RUN_QUERIES = text(
    f"""
SELECT q.candidate_set_id, cs.name, cs.k, COUNT(*) AS n_queries, {_recall_sql("p.rank")}
FROM (SELECT DISTINCT r.candidate_set_id, rq.query_id
        FROM run_queries rq JOIN runs r ON r.id = rq.run_id
       WHERE rq.run_id IN :run_ids AND rq.done_at IS NOT NULL) q
JOIN candidate_sets cs ON cs.id = q.candidate_set_id
LEFT JOIN (SELECT c.candidate_set_id, c.query_id, c.rank
             FROM candidates c
             JOIN ground_truth g ON g.query_id = c.query_id AND g.tile_id = c.tile_id AND g.relation = 'positive') p
       ON p.candidate_set_id = q.candidate_set_id AND p.query_id = q.query_id
GROUP BY q.candidate_set_id, cs.name, cs.k
ORDER BY q.candidate_set_id
"""
).bindparams(bindparam("run_ids", expanding=True))


def all_run_ids(s: Session) -> list[int]:
    return list(s.scalars(text("SELECT id FROM runs ORDER BY id")))


def all_candidate_set_ids(s: Session) -> list[int]:
    return list(s.scalars(text("SELECT id FROM candidate_sets ORDER BY id")))


def existing_run_ids(s: Session, run_ids: Sequence[int]) -> set[int]:
    stmt = text("SELECT id FROM runs WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))
    return set(s.scalars(stmt, {"ids": list(run_ids)}))


def run_recall(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One row per run (only runs with at least one finished query)."""
    if not run_ids:
        return []
    return [dict(r._mapping) for r in s.execute(RUN_RECALL, {"run_ids": list(run_ids)})]


def baseline_on_run_queries(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    if not run_ids:
        return []
    return [dict(r._mapping) for r in s.execute(BASELINE_ON_RUN_QUERIES, {"run_ids": list(run_ids)})]


def candidate_set_recall(s: Session, ids: Sequence[int]) -> list[dict[str, Any]]:
    if not ids:
        return []
    return [dict(r._mapping) for r in s.execute(CANDIDATE_SET_RECALL, {"ids": list(ids)})]
