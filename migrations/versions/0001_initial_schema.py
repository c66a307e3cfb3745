"""Initial schema: datasets, tiles, queries, ground truth, candidates, runs, judgments, rankings.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("root", name=op.f("uq_datasets_root")),
    )
    op.create_table(
        "candidate_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_candidate_sets_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_candidate_sets")),
        sa.UniqueConstraint("name", name=op.f("uq_candidate_sets_name")),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("city", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("panoid", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_queries_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queries")),
        sa.UniqueConstraint("dataset_id", "name", name=op.f("uq_queries_dataset_id_name")),
    )
    op.create_table(
        "tiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("city", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_tiles_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tiles")),
        sa.UniqueConstraint("dataset_id", "name", name=op.f("uq_tiles_dataset_id_name")),
    )
    op.create_table(
        "candidates",
        sa.Column("candidate_set_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("tile_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_set_id"],
            ["candidate_sets.id"],
            name=op.f("fk_candidates_candidate_set_id_candidate_sets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_candidates_query_id_queries"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tile_id"], ["tiles.id"], name=op.f("fk_candidates_tile_id_tiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("candidate_set_id", "query_id", "rank", name=op.f("pk_candidates")),
        sa.UniqueConstraint(
            "candidate_set_id",
            "query_id",
            "tile_id",
            name=op.f("uq_candidates_candidate_set_id_query_id_tile_id"),
        ),
    )
    op.create_table(
        "ground_truth",
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("tile_id", sa.Integer(), nullable=False),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("dy", sa.Float(), nullable=False),
        sa.Column("dx", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "relation IN ('positive', 'semi_positive')", name=op.f("ck_ground_truth_relation")
        ),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_ground_truth_query_id_queries"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tile_id"], ["tiles.id"], name=op.f("fk_ground_truth_tile_id_tiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("query_id", "tile_id", name=op.f("pk_ground_truth")),
    )
    with op.batch_alter_table("ground_truth", schema=None) as batch_op:
        batch_op.create_index("ix_ground_truth_positive", ["query_id", "relation"], unique=False)

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("candidate_set_id", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("prompt_name", sa.String(length=64), nullable=False),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=False),
        sa.Column("judge", sa.String(length=64), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("model_revision", sa.String(length=128), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("n_queries", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="running", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_set_id"],
            ["candidate_sets.id"],
            name=op.f("fk_runs_candidate_set_id_candidate_sets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_table(
        "pairwise_verdicts",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("tile_first", sa.Integer(), nullable=False),
        sa.Column("tile_second", sa.Integer(), nullable=False),
        sa.Column("first_wins", sa.Boolean(), nullable=True),
        sa.Column("p_first", sa.Float(), nullable=True),
        sa.Column("p_second", sa.Float(), nullable=True),
        sa.Column("reused_from_id", sa.Integer(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("raw_output", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("model_revision", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'failed')", name=op.f("ck_pairwise_verdicts_status")
        ),
        sa.CheckConstraint("tile_first <> tile_second", name=op.f("ck_pairwise_verdicts_distinct_tiles")),
        sa.ForeignKeyConstraint(
            ["query_id"],
            ["queries.id"],
            name=op.f("fk_pairwise_verdicts_query_id_queries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reused_from_id"],
            ["pairwise_verdicts.id"],
            name=op.f("fk_pairwise_verdicts_reused_from_id_pairwise_verdicts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_pairwise_verdicts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tile_first"],
            ["tiles.id"],
            name=op.f("fk_pairwise_verdicts_tile_first_tiles"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tile_second"],
            ["tiles.id"],
            name=op.f("fk_pairwise_verdicts_tile_second_tiles"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_verdicts")),
        sa.UniqueConstraint(
            "run_id",
            "query_id",
            "tile_first",
            "tile_second",
            name=op.f("uq_pairwise_verdicts_run_id_query_id_tile_first_tile_second"),
        ),
    )
    with op.batch_alter_table("pairwise_verdicts", schema=None) as batch_op:
        batch_op.create_index("ix_pairwise_verdicts_run_status", ["run_id", "status"], unique=False)

    op.create_table(
        "pointwise_scores",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("tile_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("probs", sa.JSON(), nullable=True),
        sa.Column("reused_from_id", sa.Integer(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("raw_output", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("model_revision", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'failed')", name=op.f("ck_pointwise_scores_status")
        ),
        sa.ForeignKeyConstraint(
            ["query_id"],
            ["queries.id"],
            name=op.f("fk_pointwise_scores_query_id_queries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reused_from_id"],
            ["pointwise_scores.id"],
            name=op.f("fk_pointwise_scores_reused_from_id_pointwise_scores"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_pointwise_scores_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tile_id"], ["tiles.id"], name=op.f("fk_pointwise_scores_tile_id_tiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pointwise_scores")),
        sa.UniqueConstraint(
            "run_id", "query_id", "tile_id", name=op.f("uq_pointwise_scores_run_id_query_id_tile_id")
        ),
    )
    with op.batch_alter_table("pointwise_scores", schema=None) as batch_op:
        batch_op.create_index("ix_pointwise_scores_run_status", ["run_id", "status"], unique=False)

    op.create_table(
        "rankings",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("tile_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_rankings_query_id_queries"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_rankings_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tile_id"], ["tiles.id"], name=op.f("fk_rankings_tile_id_tiles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", "rank", name=op.f("pk_rankings")),
        sa.UniqueConstraint(
            "run_id", "query_id", "tile_id", name=op.f("uq_rankings_run_id_query_id_tile_id")
        ),
    )
    op.create_table(
        "run_queries",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_run_queries_query_id_queries"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_queries_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", name=op.f("pk_run_queries")),
    )


def downgrade() -> None:
    op.drop_table("run_queries")
    op.drop_table("rankings")
    with op.batch_alter_table("pointwise_scores", schema=None) as batch_op:
        batch_op.drop_index("ix_pointwise_scores_run_status")

    op.drop_table("pointwise_scores")
    with op.batch_alter_table("pairwise_verdicts", schema=None) as batch_op:
        batch_op.drop_index("ix_pairwise_verdicts_run_status")

    op.drop_table("pairwise_verdicts")
    op.drop_table("runs")
    with op.batch_alter_table("ground_truth", schema=None) as batch_op:
        batch_op.drop_index("ix_ground_truth_positive")

    op.drop_table("ground_truth")
    op.drop_table("candidates")
    op.drop_table("tiles")
    op.drop_table("queries")
    op.drop_table("candidate_sets")
    op.drop_table("datasets")
