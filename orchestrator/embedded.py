"""The no-services mode: an in-process Celery worker thread on kombu's ``memory://`` broker.

With no ``CVGL_BROKER_URL`` the CLI starts this worker itself, consuming the run's model queue
and the coordination queue, so the same tasks run unchanged, one at a time, in this process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from celery.worker import WorkController, state

from orchestrator.tasks import app  # the coordinator's app: the workers' tasks and cvgl.advance
from workers.queues import COORDINATION_QUEUE


class _EmbeddedWorker(WorkController):
    def __init__(self, *args, **kwargs) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer) -> None:
        self.ready.set()


@contextmanager
def embedded_worker(queues: Sequence[str], startup_timeout: float = 30.0) -> Iterator[WorkController]:
    """Run a solo-pool worker thread consuming ``queues`` (plus coordination) until the block ends."""
    names = list(dict.fromkeys([*queues, COORDINATION_QUEUE]))
    worker = _EmbeddedWorker(
        app=app,
        pool_cls="solo",
        concurrency=1,
        queues=names,
        hostname="embedded@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="WARNING",
    )
    thread = threading.Thread(target=worker.start, name="cvgl-embedded-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(startup_timeout):
        raise RuntimeError("the embedded Celery worker did not start")
    try:
        yield worker
    finally:
        # stop() cancels the consumers here, in this thread: the worker thread takes no message
        # after it, and ends by itself once Celery's loop wakes from its fixed 2 s poll of the
        # in-process broker. Waiting for that would add 2 s to every embedded command.
        worker.stop(in_sighandler=False)
        thread.join(timeout=0.2)


def worker_busy() -> bool:
    """True while the embedded worker runs a task: loading a 7B model on its first task can take
    longer than the stall timeout, and a run that waits on a working worker has not stalled."""
    return bool(state.active_requests)
