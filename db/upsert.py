"""Bulk writes: INSERT ... ON CONFLICT DO NOTHING for PostgreSQL and SQLite, and the PostgreSQL
batch parameters that let one constant statement carry a whole batch of rows.

On PostgreSQL a batch travels as one parameter per column: an ``integer[]`` literal for integer
columns, or one JSON document read by ``json_populate_recordset`` (the table's own row type gives
every column its type). The SQL text is then the same for any number of rows, so psycopg and the
server parse it once; and a string join or ``json.dumps`` encodes a batch in microseconds, where
psycopg's list dumpers take 1.5 us per integer and about 10 us per string. SQLite gets
SQLAlchemy's "insertmanyvalues". Imports nothing of ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import Connection, Integer, Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

_PG = postgresql.dialect()


def _json_default(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} {value!r:.80} through a JSON recordset")


def pg_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as the JSON document :func:`pg_recordset` reads. Non-finite floats are refused here,
    with a Python error, rather than as invalid JSON by the server."""
    return json.dumps(list(rows), default=_json_default, allow_nan=False)


class IntArray(str):
    """An ``integer[]`` parameter as its text literal (``{1,2,NULL}``), sent by psycopg as is and
    typed ``integer[]``: psycopg's list dumper costs about 1.5 us an element, this join a few
    hundredths, and the server parses the literal once when the statement is bound."""


class _IntArrayDumper(Dumper):
    oid = psycopg.postgres.types["int4"].array_oid
    format = Format.TEXT

    def dump(self, obj: IntArray) -> bytes:
        return obj.encode()


psycopg.adapters.register_dumper(IntArray, _IntArrayDumper)


def pg_int_array(values: Iterable[int | None]) -> IntArray:
    return IntArray("{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}")


def pg_recordset(table: Table, param: str = "rows") -> str:
    """SQL for the rows of the JSON parameter ``param`` typed as ``table``'s rows (alias ``d``)."""
    return f"json_populate_recordset(NULL::{_PG.identifier_preparer.format_table(table)}, CAST(:{param} AS json)) AS d"


def insert_ignore(
    conn: Connection | Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    returning: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> list[tuple]:
    """Insert rows, silently skipping those whose ``key`` columns already exist.

    Args:
        conn: a connection or session inside a transaction.
        table: the target table.
        rows: dicts of column values (all with the same keys).
        key: the columns of the unique constraint that defines a duplicate.
        returning: columns to return for the rows actually inserted.
        values: columns with the same value in every row (sent once, not once per row).

    Returns:
        One tuple per inserted row (empty when ``returning`` is empty), in no particular order.
        RETURNING is the only reliable way to tell a won insert: psycopg reports rowcount -1, and
        SQLite's ``inserted_primary_key`` is stale on conflict.
    """
    if not rows:
        return []
    values = dict(values or {})
    connection = conn.connection() if isinstance(conn, Session) else conn
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return _insert_ignore_pg(connection, table, rows, key, returning, values)
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"insert_ignore supports PostgreSQL and SQLite, not {dialect}")
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(key))
    if returning:
        stmt = stmt.returning(*(table.c[c] for c in returning))
    # One single-row statement executed over all rows: SQLAlchemy's "insertmanyvalues" batches it
    # into multi-row VALUES pages (RETURNING included) and the compiled form is cached, where a
    # statement built with .values(rows) would be compiled anew, row by row, on every call.
    result = connection.execute(stmt, [{**r, **values} for r in rows])
    return [tuple(r) for r in result.all()] if returning else []


def _insert_ignore_pg(
    connection: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    returning: Sequence[str],
    values: Mapping[str, Any],
) -> list[tuple]:
    quote = _PG.identifier_preparer.quote
    per_row = [table.c[c] for c in rows[0]]
    common = [table.c[c] for c in values]
    # Integer columns travel as integer[] literals (the common case: judgment and ranking rows),
    # anything else as a JSON recordset typed by the table's row type.
    if all(isinstance(c.type, Integer) for c in per_row):
        source = "unnest({}) AS d({})".format(
            ", ".join(f":c{i}" for i in range(len(per_row))),
            ", ".join(quote(c.name) for c in per_row),
        )
        params = {f"c{i}": pg_int_array(r[c.key] for r in rows) for i, c in enumerate(per_row)}
    else:
        source = pg_recordset(table)
        params = {"rows": pg_rows(rows)}
    params.update({f"v{i}": values[c.key] for i, c in enumerate(common)})
    sql = (
        f"INSERT INTO {_PG.identifier_preparer.format_table(table)} "
        f"({', '.join(quote(c.name) for c in per_row + common)}) "
        f"SELECT {', '.join([*(f'd.{quote(c.name)}' for c in per_row), *(f':v{i}' for i in range(len(common)))])} "
        f"FROM {source} "
        f"ON CONFLICT ({', '.join(quote(k) for k in key)}) DO NOTHING"
    )
    if returning:
        sql += f" RETURNING {', '.join(quote(c) for c in returning)}"
    result = connection.execute(text(sql), params)
    return [tuple(r) for r in result.all()] if returning else []
