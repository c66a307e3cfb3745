"""Driving a rerank run from the command line: submit, resume, watch, cancel.

With ``CVGL_BROKER_URL`` set, the run's judgments go to Celery workers through Redis and this
process only sends and follows; unset (embedded), an in-process worker serves the run while this
process waits, and stops with it. A run always lives in the database: Ctrl-C while following it
(``Interrupted``) leaves it as it is and says how to watch, resume or cancel it.

Errors a user can meet are domain exceptions with one-line messages (the CLI prints them, exit 1):
``BrokerUnreachable``, ``RunStalled``, ``RunCancelled``, ``UnknownRun``.
"""

from __future__ import annotations

from collections.abc import Callable

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import hide_password
from db.models import RUN_CANCELLED, RUN_DONE, Run
from db.queries import cancel_run
from db.settings import settings
from orchestrator.coordinator import UnknownRun, advance
from orchestrator.progress import RunProgress, RunStalled, wait_for_run
from orchestrator.reconcile import Reconciled, RunCancelled, reconcile
from orchestrator.submit import RunSpec, create_run
from workers.app import app, broker_url, is_embedded
from workers.dispatch import run_shards
from workers.queues import run_queues

EMBEDDED_STALL_SECONDS = 10.0  # the in-process worker reports when it is busy: a quiet one is idle


class BrokerUnreachable(RuntimeError):
    """The broker does not answer; the message names its URL (password hidden)."""


class Interrupted(Exception):
    """Ctrl-C while following a run: the run is left as it is. The message says what to do next."""

    def __init__(self, run_id: int, embedded: bool) -> None:
        if embedded:
            text = (
                f"stopped following run {run_id}; its in-process worker stopped with this process.\n"
                f"  continue it:  orchestrator resume {run_id} --wait\n"
                f"  drop it:      orchestrator cancel {run_id}"
            )
        else:
            text = (
                f"stopped following run {run_id}; it goes on on the workers.\n"
                f"  follow it:     orchestrator watch {run_id}\n"
                f"  if it stalls:  orchestrator resume {run_id}\n"
                f"  stop it:       orchestrator cancel {run_id}"
            )
        super().__init__(text)
        self.run_id = run_id


def stall_seconds() -> float:
    """Seconds without progress before a wait reconciles (``CVGL_STALL_SECONDS``, default 60)."""
    return settings().stall_seconds


def check_broker() -> None:
    """Raise ``BrokerUnreachable`` unless the broker answers within a few seconds."""
    try:
        with app.connection_for_write(broker_url()) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
    except (KombuOperationalError, OSError) as exc:
        raise BrokerUnreachable(
            f"{_broker_unreachable(exc)}; start it (docs/deployment.md) or unset CVGL_BROKER_URL to run in "
            "this process"
        ) from exc


def _broker_unreachable(exc: BaseException) -> str:
    return f"cannot reach the broker at {hide_password(broker_url())}: {' '.join(str(exc).split())}"


def submit_run(sf: sessionmaker[Session], spec: RunSpec, wait: bool) -> int:
    """Store the run and start it; with ``wait`` (always, embedded) follow it until it is done.
    The broker is checked before anything is stored."""
    if not is_embedded():
        check_broker()
    with sf.begin() as s:
        run_id = create_run(s, spec)
    try:
        _drive(sf, run_id, wait, start=lambda: advance(run_id, sessions=sf))
    except KombuOperationalError as exc:  # the broker went away after the check
        raise BrokerUnreachable(
            f"{_broker_unreachable(exc)}; run {run_id} is stored and waits: `orchestrator resume {run_id}` "
            "once the broker is up"
        ) from exc
    return run_id


def resume_run(sf: sessionmaker[Session], run_id: int, wait: bool) -> Reconciled:
    """Re-send the run's stale judgments and replay its open queries (``reconcile``); with ``wait``
    (always, embedded) follow it until it is done.

    Raises:
        UnknownRun, RunCancelled, BrokerUnreachable, RunStalled, Interrupted.
    """
    _known(sf, run_id)
    if not is_embedded():
        check_broker()
    out: list[Reconciled] = []
    try:
        _drive(sf, run_id, wait, start=lambda: out.append(reconcile(run_id, sf)))
    except KombuOperationalError as exc:
        raise BrokerUnreachable(_broker_unreachable(exc)) from exc
    return out[0]


def watch_run(sf: sessionmaker[Session], run_id: int) -> RunProgress:
    """Follow the run until it is done, without sending anything: no message, no reconcile.

    Raises:
        RunStalled: nothing moved for the stall time (no worker serves the run; embedded, no
            process does): the message names ``orchestrator resume``.
        RunCancelled: the run is (or becomes) cancelled.
        Interrupted: Ctrl-C.
    """
    if _known(sf, run_id) == RUN_CANCELLED:
        raise RunCancelled(f"run {run_id} was cancelled")
    embedded = is_embedded()
    seconds = EMBEDDED_STALL_SECONDS if embedded else stall_seconds()
    nothing = "no process serves it (embedded: its worker runs inside `submit --wait` or `resume --wait`)"
    if not embedded:
        nothing = "are workers consuming its queues? See the worker logs"
    try:
        p = wait_for_run(
            sf,
            run_id,
            on_stall=lambda: None,
            stall_seconds=seconds,
            max_stalls=0,
            poll=0.5,
            stalled=lambda p, _n: (
                f"run {run_id} made no progress in {seconds:.0f} s ({p.judgments_pending} judgments "
                f"pending): {nothing}; `orchestrator resume {run_id}` re-sends what was lost"
            ),
        )
    except KeyboardInterrupt:
        raise Interrupted(run_id, embedded) from None
    return _ended(p)


def cancel(sf: sessionmaker[Session], run_id: int) -> str:
    """Cancel the run (``db.queries.cancel_run``); what to print. A second cancel says so.

    Raises:
        UnknownRun: no such run.
        ValueError: the run is done already.
    """
    with sf.begin() as s:
        before, closed = cancel_run(s, run_id)
    if before is None:
        raise UnknownRun(f"run {run_id} does not exist")
    if before == RUN_CANCELLED:
        return f"run {run_id} is already cancelled"
    if before == RUN_DONE:
        raise ValueError(f"run {run_id} is done; there is nothing to cancel")
    return f"run {run_id} cancelled: {closed} pending judgments will not be judged"


def summary(p: RunProgress) -> str:
    """One line on a run that ended."""
    return (
        f"run {p.run_id} {p.status}: {p.queries_done}/{p.queries_total} queries, {p.judgments_done} judgments "
        f"({p.judgments_reused} reused), {p.judgments_failed} failed"
    )


def _known(sf: sessionmaker[Session], run_id: int) -> str:
    """The run's status. Raises UnknownRun."""
    with sf() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise UnknownRun(f"run {run_id} does not exist")
        return run.status


def _ended(p: RunProgress) -> RunProgress:
    if p.status == RUN_CANCELLED:
        raise RunCancelled(
            f"run {p.run_id} was cancelled ({p.queries_done}/{p.queries_total} queries finished)"
        )
    return p


def _drive(
    sf: sessionmaker[Session], run_id: int, wait: bool, start: Callable[[], object]
) -> RunProgress | None:
    """Start (or resume) the run's work; in embedded mode, serve it in-process until done."""
    embedded = is_embedded()
    try:
        if embedded:
            from orchestrator.embedded import embedded_worker, worker_busy

            with sf() as s:
                run = s.get(Run, run_id)
                queues = run_queues(run.queue, run_shards(run.params))
            # Sent before the worker starts: a message on the in-process queue is then still there
            # when ``reconcile`` looks for it, not half taken by the worker.
            start()
            with embedded_worker(queues):
                return _ended(
                    wait_for_run(
                        sf,
                        run_id,
                        on_stall=lambda: reconcile(run_id, sf),
                        stall_seconds=EMBEDDED_STALL_SECONDS,
                        max_stalls=3,
                        busy=worker_busy,
                    )
                )
        start()
        if not wait:
            return None
        # Poll twice a second: each poll counts the run's judgments, which is work for the database.
        return _ended(
            wait_for_run(
                sf,
                run_id,
                on_stall=lambda: reconcile(run_id, sf),
                stall_seconds=stall_seconds(),
                poll=0.5,
            )
        )
    except KeyboardInterrupt:
        raise Interrupted(run_id, embedded) from None


__all__ = ["BrokerUnreachable", "Interrupted", "RunStalled", "RunCancelled", "UnknownRun"]
