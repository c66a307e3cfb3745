"""Rebuild the queue from the database: re-send stale judgments, replay every open query.

Redis may lose messages (restart without persistence, eviction, a crash between a commit and its
send). The database knows what is still needed, and which message each pending judgment was last
sent in; only judgments that are stale (``db/work_items.py``: not running under a live lease, and
whose message the broker no longer holds) are sent again, so a judgment still queued gets no
second message and no second attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.models import RUN_CANCELLED, RUN_DONE
from db.queries import run_info
from db.work_items import stale_judgments
from orchestrator.coordinator import UnknownRun, advance, strategy_for
from workers.dispatch import judgment_queues, queued_task_ids, send_judgments


class RunCancelled(ValueError):
    """The run was cancelled: nothing to resume."""


@dataclass
class Reconciled:
    requeued: int = 0
    tasks_sent: int = 0
    new_judgments: int = 0
    finished_queries: int = 0
    run_done: bool = False


def reconcile(run_id: int, sessions: sessionmaker[Session] | None = None) -> Reconciled:
    """Re-send the run's stale judgments, then advance every open query.

    Raises:
        UnknownRun: no such run.
        RunCancelled: the run was cancelled (``orchestrator cancel``).
    """
    sessions = sessions or session_factory()
    with sessions() as s:
        info = run_info(s, run_id)
    if info is None:
        raise UnknownRun(f"run {run_id} does not exist")
    if info.status == RUN_DONE:  # nothing pending (and a derived run has no strategy to replay)
        return Reconciled(run_done=True)
    if info.status == RUN_CANCELLED:
        raise RunCancelled(f"run {run_id} was cancelled; submit it again to rerun it")
    kind = strategy_for(info).kind
    with sessions() as s:
        rows = stale_judgments(s, run_id, kind, lambda: queued_task_ids(judgment_queues(info)))
    out = Reconciled(requeued=len(rows))
    out.tasks_sent = send_judgments(info, kind, rows, sessions=sessions)
    step = advance(run_id, sessions=sessions)
    out.tasks_sent += step.tasks_sent
    out.new_judgments = step.new_judgments
    out.finished_queries = step.finished_queries
    out.run_done = step.run_done
    return out
