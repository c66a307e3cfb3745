"""INSERT ... ON CONFLICT DO NOTHING for PostgreSQL and SQLite alike.

SQLite's dialect has no ``constraint=`` argument, so the conflict target is always the
unique key's columns. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(
    conn: Connection | Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    returning: Sequence[str] = (),
) -> list[tuple]:
    """Insert rows, silently skipping those whose ``key`` columns already exist.

    Args:
        conn: a connection or session inside a transaction.
        table: the target table.
        rows: dicts of column values (all with the same keys).
        key: the columns of the unique constraint that defines a duplicate.
        returning: columns to return for the rows actually inserted.

    Returns:
        One tuple per inserted row (empty when ``returning`` is empty). RETURNING is the only
        reliable way to tell a won insert: psycopg reports rowcount -1, and SQLite's
        ``inserted_primary_key`` is stale on conflict.
    """
    if not rows:
        return []
    dialect = conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"insert_ignore supports PostgreSQL and SQLite, not {dialect}")
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(key))
    if returning:
        stmt = stmt.returning(*(table.c[c] for c in returning))
    # One single-row statement executed over all rows: SQLAlchemy's "insertmanyvalues" batches it
    # into multi-row VALUES pages (RETURNING included) and the compiled form is cached, where a
    # statement built with .values(rows) would be compiled anew, row by row, on every call.
    connection = conn.connection() if isinstance(conn, Session) else conn
    result = connection.execute(stmt, [dict(r) for r in rows])
    return [tuple(r) for r in result.all()] if returning else []
