"""Adapters: LoRA fine-tunes of the pairwise judge, their queries, steps and checkpoints.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

New tables only (``orchestrator finetune``): an adapter is a work item like a judgment (status,
attempts, lease, task id), ``adapter_queries`` keeps the queries it was trained and validated on
(the leakage check of ``submit --adapter``), ``training_steps`` the loss, learning rate and
validation accuracy, ``adapter_checkpoints`` the checkpoint folders a killed trainer resumes from.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("judge", sa.String(64), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("base_revision", sa.String(128), nullable=True),
        sa.Column("candidate_set_id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("adapter_sha256", sa.String(64), nullable=True),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("leased_by", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'done', 'failed')", name=op.f("ck_adapters_status")),
        sa.ForeignKeyConstraint(
            ["candidate_set_id"], ["candidate_sets.id"],
            name=op.f("fk_adapters_candidate_set_id_candidate_sets"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", name=op.f("uq_adapters_name")),
    )
    op.create_table(
        "adapter_queries",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.CheckConstraint("role IN ('train', 'val')", name=op.f("ck_adapter_queries_role")),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_queries_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_adapter_queries_query_id_queries"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("adapter_id", "query_id", name=op.f("pk_adapter_queries")),
    )
    op.create_table(
        "training_steps",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("val_accuracy", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_training_steps_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("adapter_id", "step", name=op.f("pk_training_steps")),
    )
    op.create_table(
        "adapter_checkpoints",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"],
            name=op.f("fk_adapter_checkpoints_adapter_id_adapters"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("adapter_id", "step", name=op.f("pk_adapter_checkpoints")),
    )


def downgrade() -> None:
    for table in ("adapter_checkpoints", "training_steps", "adapter_queries", "adapters"):
        op.drop_table(table)
