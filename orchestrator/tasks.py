"""The coordination task, served by ``celery -A orchestrator.tasks worker -Q coordination``.

Judgment workers send ``cvgl.advance`` (``workers.queues.ADVANCE_TASK``) by name after storing
verdicts: workers never import the orchestrator. This module defines it on the workers' Celery app,
so ``app`` here is the app a coordinator runs: the workers' tasks (the app's ``include``, imported
when a worker starts) plus this one. The embedded worker runs this ``app`` too.
"""

from __future__ import annotations

from celery import Task
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.coordinator import UnknownRun, advance
from workers.app import DB_RETRY_BACKOFF_MAX, DB_RETRY_MAX, app
from workers.queues import ADVANCE_TASK

__all__ = ["app", "advance_task"]


@app.task(
    name=ADVANCE_TASK,
    bind=True,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=DB_RETRY_BACKOFF_MAX,
    retry_jitter=True,
    max_retries=DB_RETRY_MAX,
)
def advance_task(self: Task, run_id: int, query_ids: list[int] | None = None) -> dict:
    """Advance a run's queries after their verdicts were stored."""
    try:
        result = advance(int(run_id), query_ids)
    except UnknownRun:
        return {"error": f"run {run_id} does not exist"}
    return result.__dict__
