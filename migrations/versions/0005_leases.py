"""Leases on work items: who holds a judgment (or a retrieval shard) and until when.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

A delivery used to count an attempt whenever it claimed a pending row, so a duplicate of a message
still being worked on (``resume``, a visibility-timeout redelivery, a restored Redis) looked like a
crash, and enough of them failed a healthy judgment. A claim is now a lease (``db/leases.py``):
``leased_by`` names the worker process, ``lease_until`` is renewed while it works; an attempt is
counted only when a delivery finds no live lease, and a duplicate that finds one is dropped.
Nullable columns: rows stored before this migration read as never leased.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("pairwise_verdicts", "pointwise_scores", "embedding_shards")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("leased_by", sa.String(255), nullable=True))
        op.add_column(table, sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "lease_until")
        op.drop_column(table, "leased_by")
