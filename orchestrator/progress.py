"""Where a run stands (from the database), and waiting for it with a progress bar."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from db.models import PairwiseVerdict, PointwiseScore, Run, RunQuery
from db.reuse import reused_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunProgress:
    run_id: int
    status: str
    strategy: str
    prompt: str
    judge: str
    model: str
    queries_total: int
    queries_done: int
    judgments_pending: int
    judgments_done: int
    judgments_failed: int
    judgments_reused: int = 0  # among the done: copied from earlier runs, not judged again

    @property
    def finished(self) -> bool:
        return self.status == "done"

    def fingerprint(self) -> tuple[int, int, int, int]:
        return (self.queries_done, self.judgments_pending, self.judgments_done, self.judgments_failed)


def run_progress(s: Session, run_id: int) -> RunProgress | None:
    run = s.get(Run, run_id)
    if run is None:
        return None
    total, done = s.execute(
        select(func.count(), func.count(RunQuery.done_at)).where(RunQuery.run_id == run_id)
    ).one()
    counts = {"pending": 0, "done": 0, "failed": 0}
    for model in (PairwiseVerdict, PointwiseScore):
        for status, n in s.execute(
            select(model.status, func.count()).where(model.run_id == run_id).group_by(model.status)
        ):
            counts[status] += n
    return RunProgress(
        run_id=run.id,
        status=run.status,
        strategy=run.strategy,
        prompt=run.prompt_name,
        judge=run.judge,
        model=run.model,
        queries_total=total,
        queries_done=done,
        judgments_pending=counts["pending"],
        judgments_done=counts["done"],
        judgments_failed=counts["failed"],
        judgments_reused=reused_count(s, run_id),
    )


class RunStalled(RuntimeError):
    pass


def wait_for_run(
    sessions: sessionmaker[Session],
    run_id: int,
    *,
    on_stall: Callable[[], object] | None = None,
    stall_seconds: float = 30.0,
    timeout: float | None = None,
    poll: float = 0.25,
    progress_bar: bool = True,
    max_stalls: int | None = None,
) -> RunProgress:
    """Poll until the run is done; call ``on_stall`` (reconcile) when nothing moves for a while.

    Raises:
        TimeoutError: after ``timeout`` seconds.
        RunStalled: after ``max_stalls`` reconciles in a row that moved nothing.
    """
    start = last_change = time.monotonic()
    last = None
    bar = None
    stalls = 0
    try:
        while True:
            try:
                with sessions() as s:
                    p = run_progress(s, run_id)
            except (OperationalError, InterfaceError) as exc:  # the database restarting: keep waiting
                log.warning("database unavailable while waiting for run %d: %s", run_id, exc.orig or exc)
                time.sleep(1.0)
                continue
            assert p is not None
            if bar is None and progress_bar:
                bar = tqdm(
                    total=p.queries_total,
                    desc=f"run {run_id}",
                    unit="query",
                    dynamic_ncols=True,
                    mininterval=0.5,
                )
            if bar is not None:
                bar.update(p.queries_done - bar.n)
                bar.set_postfix(
                    judged=p.judgments_done,
                    reused=p.judgments_reused,
                    pending=p.judgments_pending,
                    failed=p.judgments_failed,
                )
            if p.finished:
                return p
            now = time.monotonic()
            if p.fingerprint() != last:
                last, last_change, stalls = p.fingerprint(), now, 0
            elif on_stall is not None and now - last_change > stall_seconds:
                if max_stalls is not None and stalls >= max_stalls:
                    raise RunStalled(
                        f"run {run_id} made no progress in {stalls} reconciles ({p.judgments_pending} judgments "
                        "pending): are workers consuming its queue? See the worker logs."
                    )
                on_stall()
                stalls += 1
                last_change = now
            if timeout is not None and now - start > timeout:
                raise TimeoutError(
                    f"run {run_id} not done after {timeout:.0f} s ({p.queries_done}/{p.queries_total} queries)"
                )
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
