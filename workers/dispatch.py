"""Sending judgments to the workers: which queue, in what tasks, with what time limit.

Used by the coordinator (new judgments), ``reconcile`` (lost ones) and a worker whose batch hit
its time limit (sent again at once). A task carries judgment ids of one run, those of a query
side by side; with several per-GPU queues each query's go to its own (``workers/queues.py``).
The hard time limit grows with the task's size: ``CVGL_TASK_TIME_LIMIT_BASE`` (the first task of a
worker loads its model) plus ``CVGL_JUDGMENT_TIME_LIMIT`` per judgment. A task stopped there (a
hung GPU) is sent again and its judgments are taken one at a time, as after a crash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery.utils import uuid
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.queries import JUDGMENT_MODELS, RunInfo, chunked
from db.settings import settings
from db.work_items import record_sent
from workers.app import app, is_embedded
from workers.queues import JUDGE_TASKS, run_queues, shard_of, shard_queue


def time_limit(n_judgments: int) -> float:
    """Seconds a task of ``n_judgments`` may run before its worker process is stopped."""
    current = settings()
    return current.task_time_limit_base + current.judgment_time_limit * n_judgments


def run_shards(params: Mapping[str, Any] | None) -> int:
    """A run's per-GPU queues per model, from its params (stored at submit, so resume sends where
    the workers listen)."""
    return max(1, int((params or {}).get("shards") or 1))


def send_judgments(
    info: RunInfo,
    kind: str,
    rows: Sequence[tuple[int, int]],
    countdown: float | None = None,
    batch_size: int | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> int:
    """Send judgments ``(id, query_id)`` of run ``info`` in tasks of ``batch_size`` (default the
    run's), after ``countdown`` seconds; returns tasks sent. Each row's task id is recorded first
    (``db/work_items.py``): a send that then fails leaves rows that ``resume`` finds stale."""
    shards = run_shards(info.params)
    by_queue: dict[str, list[int]] = {}
    for row_id, query_id in sorted(rows, key=lambda r: (r[1], r[0])):
        queue = shard_queue(info.queue, shard_of(query_id, shards), shards)
        by_queue.setdefault(queue, []).append(row_id)
    tasks = [
        (uuid(), queue, list(batch))
        for queue, ids in by_queue.items()
        for batch in chunked(ids, max(1, batch_size or info.batch_size))
    ]
    if not tasks:
        return 0
    with (sessions or session_factory()).begin() as s:
        record_sent(s, JUDGMENT_MODELS[kind].__table__, {task_id: ids for task_id, _, ids in tasks})
    for task_id, queue, ids in tasks:
        app.send_task(
            JUDGE_TASKS[kind],
            args=[ids],
            queue=queue,
            task_id=task_id,
            time_limit=time_limit(len(ids)),
            countdown=countdown,
        )
    return len(tasks)


def judgment_queues(info: RunInfo) -> list[str]:
    """Every queue the run's judgments are sent to."""
    return run_queues(info.queue, run_shards(info.params))


def queued_task_ids(queues: Iterable[str]) -> set[str]:
    """Ids of the messages the broker holds for ``queues``: waiting in them, or delivered to a
    worker and not acknowledged yet (Redis: the ``unacked`` hash, where late-acknowledged and
    countdown messages sit while a worker holds them). Read unacknowledged, waiting, then
    unacknowledged again, so a message moving from one to the other is seen (``db/work_items.py``).

    Embedded (``memory://``): the in-process queues; a message the in-process worker holds is
    being judged under a lease, or is about to be.
    """
    queues = list(queues)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        if is_embedded():
            held = getattr(channel, "queues", {})
            return {_message_id(m) for q in queues if q in held for m in list(held[q].queue)} - {None}
        client = channel.client
        ids = _unacked_ids(client, channel.unacked_key)
        for queue in queues:
            # Each priority step has its own list (kombu's Redis transport); step 0 is the queue itself.
            for name in dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps):
                ids.update(_message_id(m) for m in client.lrange(name, 0, -1))
        ids |= _unacked_ids(client, channel.unacked_key)
    ids.discard(None)
    return ids


def _unacked_ids(client: Any, key: str) -> set[str | None]:
    out: set[str | None] = set()
    for value in client.hvals(key):
        try:
            out.add(_message_id(json.loads(value)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    return out


def _message_id(message: Any) -> str | None:
    """The Celery task id of a kombu message (a dict, or its JSON text)."""
    try:
        if isinstance(message, bytes | str):
            message = json.loads(message)
        headers = message.get("headers") or {}
        return headers.get("id") or (message.get("properties") or {}).get("correlation_id")
    except (ValueError, AttributeError):
        return None
