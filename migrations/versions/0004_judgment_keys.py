"""Judgment rows: one foreign key to their run's query, and no (run_id, status) index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Each foreign key costs PostgreSQL a lookup and a row lock on every insert: four per judgment row
took 30 us of the 60 us an insert cost the server (``benchmarks/throughput.py --pg-stats``). One
composite key (run_id, query_id) -> run_queries now says more (the query belongs to that run) for
a quarter of the cost, and deleting a run still cascades through run_queries. The tile columns keep
no foreign key: the coordinator names tiles only from the run's candidate list, whose rows carry
theirs, and a dataset's tiles go only with the dataset, whose runs go with it.

The (run_id, status) indexes go too. Every completion changes ``status``, so the index made each
one a non-HOT update writing three index entries; and with statistics a little stale (a run's rows
turn from pending to done faster than autovacuum analyses them) the planner used it to scan all
pending rows of the table for a batch update by id, at 30 ms a batch. Progress counts and
``resume`` read a run's rows through the unique (run_id, query_id, ...) index instead.

On PostgreSQL the judgment tables get fillfactor 70: a row is inserted pending and updated twice
(claimed, completed), and room left in the page lets those be HOT updates, with no new index
entries (the completion's server time fell from 24 to 19 us a judgment).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Room for the two updates of each judgment row in its page (HOT updates: no new index entries).
FILLFACTOR = 70
# The judgment tables and their (run_id, status) index.
STATUS_INDEXES = {
    "pairwise_verdicts": "ix_pairwise_verdicts_run_status",
    "pointwise_scores": "ix_pointwise_scores_run_status",
}
# table -> its tile columns
TABLES = {
    "pairwise_verdicts": ("tile_first", "tile_second"),
    "pointwise_scores": ("tile_id",),
    "rankings": ("tile_id",),
}


def _recall_views():
    """Migration 0002's view definitions (SQLite rebuilds these tables, so the views go and return)."""
    spec = importlib.util.spec_from_file_location("recall_views_0002", Path(__file__).with_name("0002_recall_views.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drop_views() -> None:
    op.execute("DROP VIEW IF EXISTS run_recall")
    op.execute("DROP VIEW IF EXISTS run_query_ranks")


def _create_views() -> None:
    views = _recall_views()
    op.execute(views.RUN_QUERY_RANKS)
    op.execute(views.RUN_RECALL)


def upgrade() -> None:
    _drop_views()
    for table, tiles in TABLES.items():
        with op.batch_alter_table(table) as batch:
            for column, referred in [("run_id", "runs"), ("query_id", "queries"), *((t, "tiles") for t in tiles)]:
                batch.drop_constraint(op.f(f"fk_{table}_{column}_{referred}"), type_="foreignkey")
            batch.create_foreign_key(
                op.f(f"fk_{table}_run_id_run_queries"),
                "run_queries",
                ["run_id", "query_id"],
                ["run_id", "query_id"],
                ondelete="CASCADE",
            )
            if table in STATUS_INDEXES:
                batch.drop_index(STATUS_INDEXES[table])
    if op.get_context().dialect.name == "postgresql":
        for table in STATUS_INDEXES:  # the judgment tables
            op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")
    _create_views()


def downgrade() -> None:
    _drop_views()
    if op.get_context().dialect.name == "postgresql":
        for table in STATUS_INDEXES:
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    for table, tiles in TABLES.items():
        with op.batch_alter_table(table) as batch:
            if table in STATUS_INDEXES:
                batch.create_index(STATUS_INDEXES[table], ["run_id", "status"])
            batch.drop_constraint(op.f(f"fk_{table}_run_id_run_queries"), type_="foreignkey")
            batch.create_foreign_key(op.f(f"fk_{table}_run_id_runs"), "runs", ["run_id"], ["id"], ondelete="CASCADE")
            batch.create_foreign_key(
                op.f(f"fk_{table}_query_id_queries"), "queries", ["query_id"], ["id"], ondelete="CASCADE"
            )
            for column in tiles:
                batch.create_foreign_key(
                    op.f(f"fk_{table}_{column}_tiles"), "tiles", [column], ["id"], ondelete="CASCADE"
                )
    _create_views()
