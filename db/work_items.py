"""Work items: judgments and retrieval shards share one protocol, and one re-send rule.

A work item is a row that is created ``pending``, sent to a queue in a Celery message (its
``task_id`` and ``enqueued_at`` recorded here just before the send), leased by the worker that
takes it (``db/leases.py``) and completed once, ``done`` or ``failed``, by the lease holder.

The re-send rule (``resume``, a stalled wait, ``retrieve`` run again): an item is sent again only
when it is **stale**, that is pending, under no live lease (not running: no holder, or the lease
ran out, or its holder process on this host is gone) and not known to be queued (its last
``task_id`` is not among the messages the broker still holds, waiting or delivered but not
acknowledged, ``workers.dispatch.queued_task_ids``). An item whose task id was recorded but whose
send never happened (a crash, the broker down) is therefore stale, as it should be. The broker is
read in three passes (unacknowledged, waiting, unacknowledged again) so that a message moving
between the two is seen; in the moment between a worker popping a message and recording it as
unacknowledged it is in neither, and a re-send then is a duplicate, which costs nothing (leases).

Imports only ``db`` modules.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, Table, select, update
from sqlalchemy.orm import Session

from db.leases import PENDING, live_lease
from db.models import EmbeddingShard
from db.queries import JUDGMENT_MODELS, id_parts, is_postgres, member_of, now


def stale(
    session: Session,
    table: Table,
    where: Any,
    queued: Callable[[], Container[str]],
    columns: Sequence[str] = (),
    order_by: Sequence[Any] = (),
) -> list[Row]:
    """The pending items of ``table`` matching ``where`` that are stale (see the module docstring):
    rows of ``id`` and ``columns``. ``queued()``: the task ids the broker holds, asked after the
    rows are read, so that an item sent or taken meanwhile is found in the broker."""
    stmt = (
        select(
            table.c.id,
            *(table.c[c] for c in columns),
            table.c.task_id,
            table.c.leased_by,
            table.c.lease_until,
        )
        .where(where, table.c.status == PENDING)
        .order_by(*order_by, table.c.id)
    )
    at = now()
    idle = [r for r in session.execute(stmt) if not live_lease(r.leased_by, r.lease_until, at)]
    held = queued() if any(r.task_id is not None for r in idle) else ()
    return [r for r in idle if r.task_id is None or r.task_id not in held]


def record_sent(session: Session, table: Table, task_ids: Mapping[str, Sequence[int]]) -> None:
    """Record the message each item is about to be sent in (``task id -> item ids``)."""
    pg = is_postgres(session)
    stmt = update(table).where(member_of(table.c.id, "ids", pg), table.c.status == PENDING)
    at = now()
    conn = session.connection()
    for task_id, ids in task_ids.items():
        for part in id_parts(ids, pg):
            conn.execute(stmt.values(task_id=task_id, enqueued_at=at), {"ids": part})


def stale_judgments(
    session: Session, run_id: int, kind: str, queued: Callable[[], Container[str]]
) -> list[tuple[int, int]]:
    """``(id, query_id)`` of the run's stale judgments, by query."""
    t = JUDGMENT_MODELS[kind].__table__
    rows = stale(session, t, t.c.run_id == run_id, queued, columns=("query_id",), order_by=(t.c.query_id,))
    return [(r.id, r.query_id) for r in rows]


def stale_shards(session: Session, retrieval_run_id: int, queued: Callable[[], Container[str]]) -> list[int]:
    """Ids of the retrieval run's stale shards: queries before tiles, by shard index."""
    t = EmbeddingShard.__table__
    rows = stale(
        session,
        t,
        t.c.retrieval_run_id == retrieval_run_id,
        queued,
        order_by=(t.c.kind.desc(), t.c.shard_index),
    )
    return [r.id for r in rows]
