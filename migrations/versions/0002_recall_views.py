"""Recall@k views: per query, per run (with the stage-1 baseline on the same queries), per candidate set.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

R@k counts the positive tile only (semi-positives are misses), as VIGOR and Sample4Geo do.
A positive outside the reranked top-K is a miss. Runs count only queries whose ranking is written.
The SQL is plain enough for SQLite and PostgreSQL alike; psql users can select from these views.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _recall_columns(rank_col: str, prefix: str) -> str:
    return ",\n    ".join(
        f"CAST(100.0 * AVG(CASE WHEN {rank_col} <= {k} THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION)"
        f" AS {prefix}recall_at_{k}"
        for k in (1, 3, 5, 10)
    )


RUN_QUERY_RANKS = """
CREATE VIEW run_query_ranks AS
SELECT
    rq.run_id,
    rq.query_id,
    r.candidate_set_id,
    CASE WHEN rq.done_at IS NULL THEN 0 ELSE 1 END AS done,
    (SELECT c.rank
       FROM candidates c
       JOIN ground_truth g ON g.query_id = c.query_id AND g.tile_id = c.tile_id AND g.relation = 'positive'
      WHERE c.candidate_set_id = r.candidate_set_id AND c.query_id = rq.query_id AND c.rank <= r.k
    ) AS stage1_rank,
    (SELECT rk.rank
       FROM rankings rk
       JOIN ground_truth g ON g.query_id = rk.query_id AND g.tile_id = rk.tile_id AND g.relation = 'positive'
      WHERE rk.run_id = rq.run_id AND rk.query_id = rq.query_id
    ) AS final_rank
FROM run_queries rq
JOIN runs r ON r.id = rq.run_id
"""

RUN_RECALL = f"""
CREATE VIEW run_recall AS
SELECT
    r.id AS run_id,
    r.candidate_set_id,
    r.strategy,
    r.prompt_name,
    r.judge,
    r.model,
    r.k,
    r.status,
    r.n_queries AS n_planned,
    COUNT(q.query_id) AS n_queries,
    {_recall_columns("q.final_rank", "")},
    {_recall_columns("q.stage1_rank", "baseline_")}
FROM runs r
JOIN run_query_ranks q ON q.run_id = r.id AND q.done = 1
GROUP BY r.id, r.candidate_set_id, r.strategy, r.prompt_name, r.judge, r.model, r.k, r.status, r.n_queries
"""

CANDIDATE_SET_RECALL = f"""
CREATE VIEW candidate_set_recall AS
SELECT
    cs.id AS candidate_set_id,
    cs.name,
    cs.k,
    COUNT(cq.query_id) AS n_queries,
    {_recall_columns("p.rank", "")}
FROM candidate_sets cs
JOIN (SELECT DISTINCT candidate_set_id, query_id FROM candidates) cq ON cq.candidate_set_id = cs.id
LEFT JOIN (
    SELECT c.candidate_set_id, c.query_id, c.rank
      FROM candidates c
      JOIN ground_truth g ON g.query_id = c.query_id AND g.tile_id = c.tile_id AND g.relation = 'positive'
) p ON p.candidate_set_id = cq.candidate_set_id AND p.query_id = cq.query_id
GROUP BY cs.id, cs.name, cs.k
"""


def upgrade() -> None:
    op.execute(RUN_QUERY_RANKS)
    op.execute(RUN_RECALL)
    op.execute(CANDIDATE_SET_RECALL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS candidate_set_recall")
    op.execute("DROP VIEW IF EXISTS run_recall")
    op.execute("DROP VIEW IF EXISTS run_query_ranks")
