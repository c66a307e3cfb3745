"""Derived runs: a run's parent and method, and the dev queries a derived run was fitted on.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

``orchestrator calibrate`` creates a run from a finished run's stored judgments and the stage-1
order, fitted on a seeded share of the parent's queries. ``derived_runs`` names the parent (set
NULL if the parent is deleted) and the method; ``fit_queries`` lists the dev queries; the derived
run's own ``run_queries`` are the remaining (test) queries only. New tables only: adding a column
to ``runs`` would make SQLite rebuild it, and dropping the old table cascades into its children.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "derived_runs",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("parent_run_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_derived_runs_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_run_id"],
            ["runs.id"],
            name=op.f("fk_derived_runs_parent_run_id_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_derived_runs")),
    )
    op.create_table(
        "fit_queries",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_fit_queries_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["query_id"], ["queries.id"], name=op.f("fk_fit_queries_query_id_queries"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "query_id", name=op.f("pk_fit_queries")),
    )


def downgrade() -> None:
    op.drop_table("fit_queries")
    op.drop_table("derived_runs")
