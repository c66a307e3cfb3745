"""The SQL that reports read, parameterised. Every query of a positive's stage-1 rank goes
through the view ``positive_ranks`` and every per-run query through ``run_query_ranks``
(migration 0006).

R@k counts the positive only. ``run_query_ranks`` cuts a run's stage-1 rank at the run's K, so a
run's baseline is on that run's queries and at that run's K. The views ``run_recall`` and
``candidate_set_recall`` give the same recalls to psql users (docs/sql.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session


def _rows(s: Session, stmt, **params: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in s.execute(stmt, params)]


def all_run_ids(s: Session) -> list[int]:
    return list(s.scalars(text("SELECT id FROM runs ORDER BY id")))


def all_candidate_set_ids(s: Session) -> list[int]:
    return list(s.scalars(text("SELECT id FROM candidate_sets ORDER BY id")))


def existing_run_ids(s: Session, run_ids: Sequence[int]) -> set[int]:
    stmt = text("SELECT id FROM runs WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))
    return set(s.scalars(stmt, {"ids": list(run_ids)}))


# One row per (run, finished query): the positive's rank after reranking, and in stage 1 when
# within the run's K (None: not there).
RUN_QUERY_HITS = text(
    "SELECT run_id, query_id, candidate_set_id, k, final_rank, stage1_rank FROM run_query_ranks"
    " WHERE run_id IN :run_ids AND done = 1 ORDER BY run_id, query_id"
).bindparams(bindparam("run_ids", expanding=True))

# Per (candidate set, any of its queries): the positive's stage-1 rank among all its candidates.
CANDIDATE_SET_QUERY_HITS = text(
    """
SELECT cq.candidate_set_id, cs.name AS candidates, cs.k, cq.query_id, p.rank AS stage1_rank
  FROM (SELECT DISTINCT candidate_set_id, query_id FROM candidates WHERE candidate_set_id IN :ids) cq
  JOIN candidate_sets cs ON cs.id = cq.candidate_set_id
  LEFT JOIN positive_ranks p ON p.candidate_set_id = cq.candidate_set_id AND p.query_id = cq.query_id
 ORDER BY cq.candidate_set_id, cq.query_id
"""
).bindparams(bindparam("ids", expanding=True))

def run_query_hits(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(s, RUN_QUERY_HITS, run_ids=list(run_ids)) if run_ids else []


def candidate_set_query_hits(s: Session, ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(s, CANDIDATE_SET_QUERY_HITS, ids=list(ids)) if ids else []


# Stage-1 retrieval runs over the whole gallery (view ``retrieval_recall``, migration 0003):
# R@1/3/5/10 and R@1% count the positive alone; the hit rate lets semi-positives rank above it.
RETRIEVAL_RECALL = text(
    "SELECT rr.*, cs.name AS candidates FROM retrieval_recall rr"
    " LEFT JOIN candidate_sets cs ON cs.id = rr.candidate_set_id ORDER BY rr.retrieval_run_id"
)


def retrieval_recall(
    s: Session,
    retrieval_run_ids: Sequence[int] | None = None,
    candidate_set_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One row per ranked retrieval run, optionally only these runs or those behind these candidate sets."""
    rows = _rows(s, RETRIEVAL_RECALL)
    if retrieval_run_ids is not None:
        rows = [r for r in rows if r["retrieval_run_id"] in set(retrieval_run_ids)]
    if candidate_set_ids is not None:
        rows = [r for r in rows if r["candidate_set_id"] in set(candidate_set_ids)]
    return rows


# Cost of a run over its finished queries: judgments asked (reused ones included), failed ones,
# and the judge time the workers measured (reused judgments cost this run nothing).
_JUDGMENTS = """
    SELECT run_id, query_id, status, latency_ms, reused_from_id, model_revision
      FROM pairwise_verdicts WHERE run_id IN :run_ids
    UNION ALL
    SELECT run_id, query_id, status, latency_ms, reused_from_id, model_revision
      FROM pointwise_scores WHERE run_id IN :run_ids
"""

RUN_COST = text(
    f"""
WITH j AS ({_JUDGMENTS}),
per_query AS (
    SELECT rq.run_id, rq.query_id,
           COUNT(CASE WHEN j.status IN ('done', 'failed') THEN 1 END) AS judgments,
           COUNT(CASE WHEN j.status = 'failed' THEN 1 END) AS failed,
           COUNT(j.reused_from_id) AS reused,
           COALESCE(SUM(CASE WHEN j.reused_from_id IS NULL THEN j.latency_ms END), 0) AS latency_ms
      FROM run_queries rq
      LEFT JOIN j ON j.run_id = rq.run_id AND j.query_id = rq.query_id
     WHERE rq.run_id IN :run_ids AND rq.done_at IS NOT NULL
     GROUP BY rq.run_id, rq.query_id
)
SELECT p.run_id, r.model_revision AS run_revision, r.prompt_sha256, COUNT(*) AS n_queries,
       CAST(AVG(p.judgments) AS DOUBLE PRECISION) AS judgments_per_query_mean,
       MAX(p.judgments) AS judgments_per_query_max,
       CAST(SUM(p.judgments) AS INTEGER) AS judgments, CAST(SUM(p.failed) AS INTEGER) AS failed_judgments,
       CAST(SUM(p.reused) AS INTEGER) AS reused_judgments,
       CAST(SUM(p.latency_ms) / 1000.0 / COUNT(*) AS DOUBLE PRECISION) AS gpu_seconds_per_query
  FROM per_query p JOIN runs r ON r.id = p.run_id
 GROUP BY p.run_id, r.model_revision, r.prompt_sha256
 ORDER BY p.run_id
"""
).bindparams(bindparam("run_ids", expanding=True))

JUDGMENT_REVISIONS = text(
    f"SELECT DISTINCT run_id, model_revision FROM ({_JUDGMENTS}) j"
    " WHERE model_revision IS NOT NULL ORDER BY run_id, model_revision"
).bindparams(bindparam("run_ids", expanding=True))

# Pairwise verdicts by the stage-1 ranks of the tiles shown first and second, and whether either
# is the positive. Failed verdicts are left out: the judge gave no answer.
POSITION_COUNTS = text(
    """
SELECT v.run_id, r.candidate_set_id, cf.rank AS first_rank, cs.rank AS second_rank,
       CASE WHEN gf.tile_id IS NULL THEN 0 ELSE 1 END AS first_positive,
       CASE WHEN gs.tile_id IS NULL THEN 0 ELSE 1 END AS second_positive,
       COUNT(*) AS n, SUM(CASE WHEN v.first_wins THEN 1 ELSE 0 END) AS first_wins
  FROM pairwise_verdicts v
  JOIN runs r ON r.id = v.run_id
  JOIN candidates cf ON cf.candidate_set_id = r.candidate_set_id AND cf.query_id = v.query_id
                    AND cf.tile_id = v.tile_first
  JOIN candidates cs ON cs.candidate_set_id = r.candidate_set_id AND cs.query_id = v.query_id
                    AND cs.tile_id = v.tile_second
  LEFT JOIN positive_ranks gf ON gf.candidate_set_id = r.candidate_set_id AND gf.query_id = v.query_id
                             AND gf.tile_id = v.tile_first
  LEFT JOIN positive_ranks gs ON gs.candidate_set_id = r.candidate_set_id AND gs.query_id = v.query_id
                             AND gs.tile_id = v.tile_second
 WHERE v.run_id IN :run_ids AND v.status = 'done'
 GROUP BY v.run_id, r.candidate_set_id, cf.rank, cs.rank,
          CASE WHEN gf.tile_id IS NULL THEN 0 ELSE 1 END, CASE WHEN gs.tile_id IS NULL THEN 0 ELSE 1 END
 ORDER BY v.run_id, cf.rank, cs.rank
"""
).bindparams(bindparam("run_ids", expanding=True))

# Share of a candidate set's queries whose positive sits at each stage-1 rank.
POSITIVE_RANK_SHARES = text(
    """
SELECT p.candidate_set_id, p.rank,
       CAST(COUNT(*) AS DOUBLE PRECISION)
       / (SELECT COUNT(DISTINCT c2.query_id) FROM candidates c2 WHERE c2.candidate_set_id = p.candidate_set_id)
       AS share
  FROM positive_ranks p
 WHERE p.candidate_set_id IN :ids
 GROUP BY p.candidate_set_id, p.rank
 ORDER BY p.candidate_set_id, p.rank
"""
).bindparams(bindparam("ids", expanding=True))

POINTWISE_SCORES = text(
    """
SELECT s.run_id, s.query_id, s.score, CASE WHEN p.tile_id IS NULL THEN 0 ELSE 1 END AS positive
  FROM pointwise_scores s
  JOIN runs r ON r.id = s.run_id
  LEFT JOIN positive_ranks p ON p.candidate_set_id = r.candidate_set_id AND p.query_id = s.query_id
                            AND p.tile_id = s.tile_id
 WHERE s.run_id IN :run_ids AND s.status = 'done' AND s.score IS NOT NULL
 ORDER BY s.run_id, s.id
"""
).bindparams(bindparam("run_ids", expanding=True))

# Pairwise calibration: P(first) of each answered comparison with the positive shown first or
# second (the only pairs whose better tile is known). Generated verdicts store no probability.
PAIRWISE_PROBABILITIES = text(
    """
SELECT v.run_id, v.p_first, v.p_second, CASE WHEN p.tile_id = v.tile_first THEN 1 ELSE 0 END AS first_positive
  FROM pairwise_verdicts v
  JOIN runs r ON r.id = v.run_id
  JOIN positive_ranks p ON p.candidate_set_id = r.candidate_set_id AND p.query_id = v.query_id
                       AND p.tile_id IN (v.tile_first, v.tile_second)
 WHERE v.run_id IN :run_ids AND v.status = 'done' AND v.p_first IS NOT NULL AND v.p_second IS NOT NULL
 ORDER BY v.run_id, v.id
"""
).bindparams(bindparam("run_ids", expanding=True))

RUNS = text(
    "SELECT r.id AS run_id, r.candidate_set_id, cs.name AS candidates, r.strategy, r.prompt_name, r.judge,"
    " r.model, r.model_revision, r.prompt_sha256, r.k, r.status, r.n_queries AS n_planned, r.batch_size, r.params,"
    " (SELECT COUNT(rq.done_at) FROM run_queries rq WHERE rq.run_id = r.id) AS n_finished"
    " FROM runs r JOIN candidate_sets cs ON cs.id = r.candidate_set_id WHERE r.id IN :run_ids ORDER BY r.id"
).bindparams(bindparam("run_ids", expanding=True))

# Figure 5: per finished query, where the positive was in stage 1 and after reranking, and the
# reranker's top-1 with its stage-1 rank.
RUN_QUERY_OUTCOMES = text(
    """
SELECT q.query_id, qu.name AS query, p.rank AS stage1_rank, q.final_rank,
       top.tile_id AS top1_tile_id, c1.rank AS top1_stage1_rank
  FROM run_query_ranks q
  JOIN queries qu ON qu.id = q.query_id
  JOIN rankings top ON top.run_id = q.run_id AND top.query_id = q.query_id AND top.rank = 1
  LEFT JOIN candidates c1 ON c1.candidate_set_id = q.candidate_set_id AND c1.query_id = q.query_id
                         AND c1.tile_id = top.tile_id
  LEFT JOIN positive_ranks p ON p.candidate_set_id = q.candidate_set_id AND p.query_id = q.query_id
 WHERE q.run_id = :run_id AND q.done = 1
 ORDER BY q.query_id
"""
)

QUERY_IMAGES = text(
    "SELECT qu.id AS query_id, qu.name, qu.path, d.root FROM queries qu JOIN datasets d ON d.id = qu.dataset_id"
    " WHERE qu.id IN :query_ids"
).bindparams(bindparam("query_ids", expanding=True))

# The first ``n_tiles`` stage-1 candidates of the queries, plus the reranker's top-1 and the true
# tile wherever they sit.
CANDIDATE_IMAGES = text(
    """
SELECT c.query_id, c.rank AS stage1_rank, c.tile_id, t.name, t.path,
       CASE WHEN g.tile_id IS NULL THEN 0 ELSE 1 END AS positive,
       CASE WHEN top.tile_id IS NULL THEN 0 ELSE 1 END AS reranked_top1
  FROM runs r
  JOIN candidates c ON c.candidate_set_id = r.candidate_set_id
  JOIN tiles t ON t.id = c.tile_id
  LEFT JOIN positive_ranks g ON g.candidate_set_id = r.candidate_set_id AND g.query_id = c.query_id
                            AND g.tile_id = c.tile_id
  LEFT JOIN rankings top ON top.run_id = r.id AND top.query_id = c.query_id AND top.tile_id = c.tile_id
                        AND top.rank = 1
 WHERE r.id = :run_id AND c.query_id IN :query_ids
   AND (c.rank <= :n_tiles OR top.tile_id IS NOT NULL OR g.tile_id IS NOT NULL)
 ORDER BY c.query_id, c.rank
"""
).bindparams(bindparam("query_ids", expanding=True))


def run_cost(s: Session, run_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per run, over its finished queries: judgments per query, failures, judge seconds, provenance."""
    if not run_ids:
        return {}
    out = {r["run_id"]: r for r in _rows(s, RUN_COST, run_ids=list(run_ids))}
    revisions: dict[int, list[str]] = {}
    for r in _rows(s, JUDGMENT_REVISIONS, run_ids=list(run_ids)):
        revisions.setdefault(r["run_id"], []).append(r["model_revision"])
    for run_id, row in out.items():
        row["judgment_revisions"] = revisions.get(run_id, [])
    return out


def position_counts(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(s, POSITION_COUNTS, run_ids=list(run_ids)) if run_ids else []


def positive_rank_shares(s: Session, candidate_set_ids: Sequence[int]) -> dict[int, dict[int, float]]:
    """candidate set -> stage-1 rank -> share of its queries whose positive sits at that rank."""
    out: dict[int, dict[int, float]] = {}
    if candidate_set_ids:
        for r in _rows(s, POSITIVE_RANK_SHARES, ids=list(candidate_set_ids)):
            out.setdefault(r["candidate_set_id"], {})[r["rank"]] = r["share"]
    return out


def pointwise_scores(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(s, POINTWISE_SCORES, run_ids=list(run_ids)) if run_ids else []


def runs(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The runs' settings and provenance (``params`` decoded), whether or not any query is finished."""
    out = _rows(s, RUNS, run_ids=list(run_ids)) if run_ids else []
    for r in out:
        # A JSON column read through text(): psycopg decodes it, SQLite hands back the string.
        if isinstance(r["params"], str):
            r["params"] = json.loads(r["params"])
        r["params"] = r["params"] or {}
    return out


def run_query_outcomes(s: Session, run_id: int) -> list[dict[str, Any]]:
    return _rows(s, RUN_QUERY_OUTCOMES, run_id=run_id)


def query_images(s: Session, query_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    if not query_ids:
        return {}
    return {r["query_id"]: r for r in _rows(s, QUERY_IMAGES, query_ids=list(query_ids))}


def candidate_images(s: Session, run_id: int, query_ids: Sequence[int], n_tiles: int) -> list[dict[str, Any]]:
    if not query_ids:
        return []
    return _rows(s, CANDIDATE_IMAGES, run_id=run_id, query_ids=list(query_ids), n_tiles=n_tiles)


def pairwise_probabilities(s: Session, run_ids: Sequence[int]) -> list[dict[str, Any]]:
    return _rows(s, PAIRWISE_PROBABILITIES, run_ids=list(run_ids)) if run_ids else []
