"""Where a run stands (from the database), and waiting for it with a progress bar."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from db.models import RUN_CANCELLED, RUN_DONE, Run
from db.queries import run_judgment_counts, run_query_counts
from orchestrator.strategies.base import StrategyOptionError, UnknownStrategy
from orchestrator.strategies.registry import get_strategy

log = logging.getLogger(__name__)
P = TypeVar("P")
JUDGMENT_COUNT_SECONDS = 2.0


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
    judgments_expected: int | None = None  # the strategy's bound for the run; None: unknown

    @property
    def finished(self) -> bool:
        """Done, or cancelled: nothing more will happen to it."""
        return self.status in (RUN_DONE, RUN_CANCELLED)

    def fingerprint(self) -> tuple[int, int, int, int]:
        return (self.queries_done, self.judgments_pending, self.judgments_done, self.judgments_failed)


def run_progress(s: Session, run_id: int, judgments: RunProgress | None = None) -> RunProgress | None:
    """Where the run stands. ``judgments``: take the judgment counts from this earlier reading
    instead of counting them again (counting reads every judgment row of the run)."""
    run = s.get(Run, run_id)
    if run is None:
        return None
    total, done = run_query_counts(s, run_id)
    if judgments is not None:
        return replace(judgments, status=run.status, queries_total=total, queries_done=done)
    counts = run_judgment_counts(s, run_id)
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
        judgments_reused=counts["reused"],
        judgments_expected=expected_judgments(run.strategy, (run.params or {}).get("strategy_options"), run.k, total),
    )


def expected_judgments(strategy: str, options: dict | None, k: int, queries: int) -> int | None:
    """What the run's strategy needs at most for ``queries`` queries of ``k`` candidates; None for a
    run that judges nothing (a derived run)."""
    try:
        per_query = get_strategy(strategy, **(options or {})).judgments_per_query(k)
    except (UnknownStrategy, StrategyOptionError, TypeError):
        return None
    return per_query * queries


def bar_state(p: RunProgress) -> BarState:
    """The bar counts judgments finished (done, reused or failed) against the strategy's bound; a
    run that ends under its bound ends full. Queries finished are in the postfix."""
    finished = p.judgments_done + p.judgments_failed
    total = p.judgments_expected if p.judgments_expected is not None else finished + p.judgments_pending
    if p.finished or total < finished:
        total = finished
    return BarState(
        total,
        finished,
        {
            "queries": f"{p.queries_done}/{p.queries_total}",
            "reused": p.judgments_reused,
            "pending": p.judgments_pending,
            "failed": p.judgments_failed,
        },
    )


class RunStalled(RuntimeError):
    pass


@dataclass(frozen=True)
class BarState:
    """What the progress bar shows for one poll."""

    total: int
    done: int
    postfix: dict[str, object]
    label: str | None = None


def follow(
    read: Callable[[], P],
    *,
    finished: Callable[[P], bool],
    fingerprint: Callable[[P], tuple],
    bar_state: Callable[[P], BarState],
    desc: str,
    unit: str,
    on_stall: Callable[[], object] | None = None,
    stall_seconds: float = 30.0,
    max_stalls: int | None = None,
    stalled: Callable[[P, int], str] | None = None,
    detail: Callable[[P], str] | None = None,
    timeout: float | None = None,
    poll: float = 0.25,
    progress_bar: bool = True,
    busy: Callable[[], bool] | None = None,
) -> P:
    """Poll ``read`` until ``finished``, with a tqdm bar; call ``on_stall`` when nothing moves.

    A database restart only delays the next poll. ``finished`` may raise to end the wait.
    ``busy``: True while a worker this process can see is running a task (the embedded worker
    loading a 7B model, or judging a long batch): that is not a stall.

    Raises:
        TimeoutError: after ``timeout`` seconds.
        RunStalled: after ``max_stalls`` calls of ``on_stall`` in a row that moved nothing.
    """
    start = last_change = time.monotonic()
    last: tuple | None = None
    bar = None
    stalls = 0
    try:
        while True:
            try:
                p = read()
            except (OperationalError, InterfaceError) as exc:  # the database restarting: keep waiting
                log.warning(
                    "database unavailable while waiting for %s: %s", desc, getattr(exc, "orig", None) or exc
                )
                time.sleep(1.0)
                continue
            if progress_bar:
                state = bar_state(p)
                if bar is None:
                    bar = tqdm(total=state.total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
                bar.update(state.done - bar.n)
                # As text: tqdm prints the number 10000 as 1e+4.
                bar.set_postfix({k: str(v) for k, v in state.postfix.items()})
                if state.label:
                    bar.set_description(state.label)
            if finished(p):
                if bar is not None and bar.n < bar.total:  # done under its bound: the bar ends full
                    bar.total = bar.n
                    bar.refresh()
                return p
            now = time.monotonic()
            if fingerprint(p) != last:
                last, last_change, stalls = fingerprint(p), now, 0
            elif busy is not None and busy():
                last_change = now
            elif on_stall is not None and now - last_change > stall_seconds:
                if max_stalls is not None and stalls >= max_stalls:
                    raise RunStalled(stalled(p, stalls) if stalled else f"{desc} made no progress")
                on_stall()
                stalls += 1
                last_change = now
            if timeout is not None and now - start > timeout:
                more = f" ({detail(p)})" if detail else ""
                raise TimeoutError(f"{desc} not done after {timeout:.0f} s{more}")
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()


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
    busy: Callable[[], bool] | None = None,
    stalled: Callable[[RunProgress, int], str] | None = None,
) -> RunProgress:
    """Poll until the run is done or cancelled; call ``on_stall`` (reconcile) when nothing moves for a
    while. ``stalled``: the message of ``RunStalled`` (the progress, and the stalls in a row).

    Raises:
        TimeoutError: after ``timeout`` seconds.
        RunStalled: after ``max_stalls`` reconciles in a row that moved nothing.
    """

    counted: list[tuple[float, RunProgress]] = []  # when the judgments were last counted, and how

    def read() -> RunProgress:
        # Queries done and the run's status at every poll; judgment counts (a pass over all the
        # run's judgment rows) every few seconds, and when the run is done.
        fresh = not counted or time.monotonic() - counted[-1][0] >= JUDGMENT_COUNT_SECONDS
        with sessions() as s:
            p = run_progress(s, run_id, None if fresh else counted[-1][1])
            assert p is not None
            if not fresh and p.finished:
                p = run_progress(s, run_id)
                fresh = True
        if fresh:
            counted[:] = [(time.monotonic(), p)]
        return p

    return follow(
        read,
        finished=lambda p: p.finished,
        fingerprint=lambda p: p.fingerprint(),
        bar_state=bar_state,
        desc=f"run {run_id}",
        unit="judgment",
        on_stall=on_stall,
        stall_seconds=stall_seconds,
        max_stalls=max_stalls,
        stalled=stalled
        or (
            lambda p, n: (
            f"run {run_id} made no progress in {n} reconciles ({p.judgments_pending} judgments "
            "pending): are workers consuming its queue? See the worker logs."
            )
        ),
        detail=lambda p: f"{p.queries_done}/{p.queries_total} queries",
        timeout=timeout,
        poll=poll,
        progress_bar=progress_bar,
        busy=busy,
    )


def run_status_lines(s: Session, run_id: int | None = None) -> list[str]:
    """``orchestrator status``: the table of one run, or of every run (no lines: no runs).

    Raises:
        UnknownRun: no run ``run_id``.
    """
    from db.reports import all_run_ids
    from orchestrator.coordinator import UnknownRun

    ids = [run_id] if run_id is not None else all_run_ids(s)
    rows = [p for p in (run_progress(s, r) for r in ids) if p is not None]
    if run_id is not None and not rows:
        raise UnknownRun(f"run {run_id} does not exist")
    return status_table(rows) if rows else []


STATUS_WIDTH = 120  # as the report's tables: fits a 120-column terminal


def status_table(rows: list[RunProgress], width: int = STATUS_WIDTH) -> list[str]:
    """``orchestrator status`` as lines of at most ``width`` characters: a model name that does not
    fit keeps its end (the model, not its organisation)."""
    head = (
        f"{'run':>4}  {'status':9}  {'strategy/prompt':19}  {'judge':10}  {'queries':>11} "
        f"{'judged':>6} {'reused':>6} {'pending':>7} {'failed':>6}  "
    )
    room = width - len(head)
    lines = [head + "model"]
    for p in rows:
        model = p.model if len(p.model) <= room else "…" + p.model[-(room - 1) :]
        lines.append(
            f"{p.run_id:>4}  {p.status:9}  {p.strategy + '/' + p.prompt:19}  {p.judge:10}  "
            f"{f'{p.queries_done}/{p.queries_total}':>11} {p.judgments_done:>6} {p.judgments_reused:>6} "
            f"{p.judgments_pending:>7} {p.judgments_failed:>6}  {model}"
        )
    return lines
