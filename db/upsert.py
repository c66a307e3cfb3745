"""INSERT ... ON CONFLICT DO NOTHING for PostgreSQL and SQLite alike.

SQLite's dialect has no ``constraint=`` argument, so the conflict target is always the
unique key's columns. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

# SQLite caps bound parameters per statement (32,766 since 3.32); chunk big inserts.
_MAX_PARAMS = 30_000


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
    out: list[tuple] = []
    per_row = max(1, len(rows[0]))
    step = max(1, _MAX_PARAMS // per_row)
    for chunk in _chunks(rows, step):
        stmt = insert(table).values(list(chunk)).on_conflict_do_nothing(index_elements=list(key))
        if returning:
            stmt = stmt.returning(*(table.c[c] for c in returning))
            out.extend(tuple(r) for r in conn.execute(stmt).all())
        else:
            conn.execute(stmt)
    return out


def _chunks(rows: Sequence[Mapping[str, Any]], n: int) -> Iterable[Sequence[Mapping[str, Any]]]:
    for i in range(0, len(rows), n):
        yield rows[i : i + n]
