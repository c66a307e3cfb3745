"""Task ids: the Celery message a judgment or a retrieval shard was last sent in.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

``resume`` re-sends only work items that are stale (``db/work_items.py``): pending, under no live
lease, and whose last message is no longer in the broker; ``task_id`` names that message. Added
columns only: SQLite adds a column in place, where altering one would rebuild the table and
dropping the old copy cascades into its children. A run's ``cancelled`` status needs no change
(``runs.status`` has no CHECK constraint).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("pairwise_verdicts", "pointwise_scores", "embedding_shards")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("task_id", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        # SQLite 3.35+ drops a column in place (no rebuild, so no cascade).
        op.drop_column(table, "task_id")
