"""Sending judgments to the workers: which queue, in what tasks, with what time limit.

Used by the coordinator (new judgments), ``reconcile`` (lost ones) and a worker whose batch hit
its time limit (sent again at once). A task carries judgment ids of one run, those of a query
side by side; with several per-GPU queues each query's go to its own (``workers/queues.py``).
The hard time limit grows with the task's size: ``CVGL_TASK_TIME_LIMIT_BASE`` (the first task of a
worker loads its model) plus ``CVGL_JUDGMENT_TIME_LIMIT`` per judgment. A task stopped there (a
hung GPU) is sent again and its judgments are taken one at a time, as after a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from db.queries import RunInfo, chunked
from db.settings import settings
from workers.app import app
from workers.queues import JUDGE_TASKS, shard_of, shard_queue



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
) -> int:
    """Send judgments ``(id, query_id)`` of run ``info`` in tasks of ``batch_size`` (default the
    run's), after ``countdown`` seconds; returns tasks sent."""
    shards = run_shards(info.params)
    by_queue: dict[str, list[int]] = {}
    for row_id, query_id in sorted(rows, key=lambda r: (r[1], r[0])):
        queue = shard_queue(info.queue, shard_of(query_id, shards), shards)
        by_queue.setdefault(queue, []).append(row_id)
    sent = 0
    for queue, ids in by_queue.items():
        for batch in chunked(ids, max(1, batch_size or info.batch_size)):
            app.send_task(
                JUDGE_TASKS[kind], args=[list(batch)], queue=queue, time_limit=time_limit(len(batch))
            )
            sent += 1
    return sent
