"""Rebuild the queue from the database: re-enqueue pending judgments, replay every open query.

Redis may lose messages (restart without persistence, eviction, a crash between a commit and its
enqueue). The database knows what is still needed; duplicates are harmless because a worker
skips rows that are no longer pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.queries import mark_enqueued, now, run_info, stale_pending
from orchestrator.coordinator import UnknownRun, advance, strategy_for
from workers.dispatch import send_judgments


@dataclass
class Reconciled:
    requeued: int = 0
    tasks_sent: int = 0
    new_judgments: int = 0
    finished_queries: int = 0
    run_done: bool = False


def reconcile(
    run_id: int, stale_after: float | None = 0.0, sessions: sessionmaker[Session] | None = None
) -> Reconciled:
    """Re-enqueue the run's pending judgments enqueued more than ``stale_after`` seconds ago
    (None: all of them), then advance every open query."""
    sessions = sessions or session_factory()
    with sessions() as s:
        info = run_info(s, run_id)
        if info is None:
            raise UnknownRun(f"run {run_id} does not exist")
        if info.status == "done":  # nothing pending (and a derived run has no strategy to replay)
            return Reconciled(run_done=True)
        kind = strategy_for(info).kind
        cutoff = None if stale_after is None else now() - timedelta(seconds=stale_after)
        rows = stale_pending(s, run_id, kind, cutoff)
    out = Reconciled(requeued=len(rows))
    out.tasks_sent = send_judgments(info, kind, rows)
    with sessions.begin() as s:
        mark_enqueued(s, kind, [i for i, _ in rows])
    step = advance(run_id, sessions=sessions)
    out.tasks_sent += step.tasks_sent
    out.new_judgments = step.new_judgments
    out.finished_queries = step.finished_queries
    out.run_done = step.run_done
    return out
