"""Stage-1 retrieval: runs, embedding shards, skipped images, per-query positive ranks, a recall view.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Embeddings live in float16 .npy files (one per shard) under the run's ``embeddings_dir``; the
database only references them. ``retrieval_recall`` counts, as Sample4Geo does, the gallery tiles
scoring strictly above the positive: R@k = that count < k (the positive alone, semi-positives are
negatives), R@1% uses k = gallery size // 100, and the hit rate leaves the semi-positives out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _share(condition: str) -> str:
    return f"CAST(100.0 * AVG(CASE WHEN {condition} THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION)"


RETRIEVAL_RECALL = f"""
CREATE VIEW retrieval_recall AS
SELECT
    rr.id AS retrieval_run_id,
    rr.name,
    rr.dataset_id,
    rr.candidate_set_id,
    rr.model,
    rr.random_init,
    rr.status,
    rr.k,
    rr.n_gallery,
    rr.n_gallery / 100 AS one_percent_k,
    COUNT(q.query_id) AS n_queries,
    {_share("q.positive_rank < 1")} AS recall_at_1,
    {_share("q.positive_rank < 3")} AS recall_at_3,
    {_share("q.positive_rank < 5")} AS recall_at_5,
    {_share("q.positive_rank < 10")} AS recall_at_10,
    {_share("q.positive_rank < rr.n_gallery / 100")} AS recall_at_1pct,
    {_share("q.hit_rank < 1")} AS hit_rate,
    (SELECT COUNT(*) FROM skipped_images s WHERE s.retrieval_run_id = rr.id) AS skipped_images,
    (SELECT COUNT(*) FROM skipped_images s WHERE s.retrieval_run_id = rr.id AND s.kind = 'tile')
        AS skipped_tiles,
    (SELECT COUNT(*) FROM skipped_images s WHERE s.retrieval_run_id = rr.id AND s.kind = 'query')
        AS skipped_queries
FROM retrieval_runs rr
JOIN retrieval_query_ranks q ON q.retrieval_run_id = rr.id
GROUP BY rr.id, rr.name, rr.dataset_id, rr.candidate_set_id, rr.model, rr.random_init, rr.status, rr.k,
         rr.n_gallery
"""


def upgrade() -> None:
    op.create_table(
        "retrieval_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("random_init", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("img_size", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("shard_size", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("n_tiles", sa.Integer(), nullable=False),
        sa.Column("n_queries", sa.Integer(), nullable=False),
        sa.Column("embeddings_dir", sa.Text(), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=True),
        sa.Column("n_gallery", sa.Integer(), nullable=True),
        sa.Column("candidate_set_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="running", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')", name=op.f("ck_retrieval_runs_status")),
        sa.ForeignKeyConstraint(
            ["candidate_set_id"],
            ["candidate_sets.id"],
            name=op.f("fk_retrieval_runs_candidate_set_id_candidate_sets"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_retrieval_runs_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_retrieval_runs_name")),
    )
    op.create_table(
        "embedding_shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("retrieval_run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("item_ids", sa.JSON(), nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("file", sa.String(length=255), nullable=True),
        sa.Column("n_embedded", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('tile', 'query')", name=op.f("ck_embedding_shards_kind")),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'failed')", name=op.f("ck_embedding_shards_status")
        ),
        sa.ForeignKeyConstraint(
            ["retrieval_run_id"],
            ["retrieval_runs.id"],
            name=op.f("fk_embedding_shards_retrieval_run_id_retrieval_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embedding_shards")),
        sa.UniqueConstraint(
            "retrieval_run_id",
            "kind",
            "shard_index",
            name=op.f("uq_embedding_shards_retrieval_run_id_kind_shard_index"),
        ),
    )
    with op.batch_alter_table("embedding_shards", schema=None) as batch_op:
        batch_op.create_index("ix_embedding_shards_run_status", ["retrieval_run_id", "status"], unique=False)

    op.create_table(
        "skipped_images",
        sa.Column("retrieval_run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.CheckConstraint("kind IN ('tile', 'query')", name=op.f("ck_skipped_images_kind")),
        sa.ForeignKeyConstraint(
            ["retrieval_run_id"],
            ["retrieval_runs.id"],
            name=op.f("fk_skipped_images_retrieval_run_id_retrieval_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("retrieval_run_id", "kind", "item_id", name=op.f("pk_skipped_images")),
    )
    op.create_table(
        "retrieval_query_ranks",
        sa.Column("retrieval_run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("positive_rank", sa.Integer(), nullable=True),
        sa.Column("hit_rank", sa.Integer(), nullable=True),
        sa.Column("positive_score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["query_id"],
            ["queries.id"],
            name=op.f("fk_retrieval_query_ranks_query_id_queries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["retrieval_run_id"],
            ["retrieval_runs.id"],
            name=op.f("fk_retrieval_query_ranks_retrieval_run_id_retrieval_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("retrieval_run_id", "query_id", name=op.f("pk_retrieval_query_ranks")),
    )
    op.execute(RETRIEVAL_RECALL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS retrieval_recall")
    op.drop_table("retrieval_query_ranks")
    op.drop_table("skipped_images")
    with op.batch_alter_table("embedding_shards", schema=None) as batch_op:
        batch_op.drop_index("ix_embedding_shards_run_status")
    op.drop_table("embedding_shards")
    op.drop_table("retrieval_runs")
