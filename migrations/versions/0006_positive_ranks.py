"""One positive-ranks view that every recall query reads; run_query_ranks carries the run's K.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

``positive_ranks`` is the stage-1 rank (and tile) of each query's positive in each candidate set:
the join of candidates and ground truth that the views and the report's SQL used to spell out
each time. ``run_query_ranks`` now reads it and exposes the run's ``k``: ``stage1_rank`` is the
positive's stage-1 rank when within the first K (the run's baseline is cut at the run's K), and
``final_rank`` its rank after reranking. Column names and meanings of the other views are kept.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _views_0002():
    """Migration 0002's module: its run_recall is unchanged, its other views are restored on downgrade."""
    spec = importlib.util.spec_from_file_location(
        "recall_views_0002", Path(__file__).with_name("0002_recall_views.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


POSITIVE_RANKS = """
CREATE VIEW positive_ranks AS
SELECT c.candidate_set_id, c.query_id, c.tile_id, c.rank
  FROM candidates c
  JOIN ground_truth g ON g.query_id = c.query_id AND g.tile_id = c.tile_id AND g.relation = 'positive'
"""

RUN_QUERY_RANKS = """
CREATE VIEW run_query_ranks AS
SELECT
    rq.run_id,
    rq.query_id,
    r.candidate_set_id,
    r.k,
    CASE WHEN rq.done_at IS NULL THEN 0 ELSE 1 END AS done,
    CASE WHEN p.rank <= r.k THEN p.rank END AS stage1_rank,
    rk.rank AS final_rank
FROM run_queries rq
JOIN runs r ON r.id = rq.run_id
LEFT JOIN positive_ranks p ON p.candidate_set_id = r.candidate_set_id AND p.query_id = rq.query_id
LEFT JOIN rankings rk ON rk.run_id = rq.run_id AND rk.query_id = rq.query_id AND rk.tile_id = p.tile_id
"""

CANDIDATE_SET_RECALL = """
CREATE VIEW candidate_set_recall AS
SELECT
    cs.id AS candidate_set_id,
    cs.name,
    cs.k,
    COUNT(cq.query_id) AS n_queries,
    {recall_columns}
FROM candidate_sets cs
JOIN (SELECT DISTINCT candidate_set_id, query_id FROM candidates) cq ON cq.candidate_set_id = cs.id
LEFT JOIN positive_ranks p ON p.candidate_set_id = cq.candidate_set_id AND p.query_id = cq.query_id
GROUP BY cs.id, cs.name, cs.k
"""


def _drop_views() -> None:
    for view in ("candidate_set_recall", "run_recall", "run_query_ranks", "positive_ranks"):
        op.execute(f"DROP VIEW IF EXISTS {view}")


def upgrade() -> None:
    views = _views_0002()
    _drop_views()
    candidate_set_recall = CANDIDATE_SET_RECALL.format(recall_columns=views._recall_columns("p.rank", ""))
    for sql in (POSITIVE_RANKS, RUN_QUERY_RANKS, views.RUN_RECALL, candidate_set_recall):
        op.execute(sql)


def downgrade() -> None:
    views = _views_0002()
    _drop_views()
    for sql in (views.RUN_QUERY_RANKS, views.RUN_RECALL, views.CANDIDATE_SET_RECALL):
        op.execute(sql)
