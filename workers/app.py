"""The Celery app (``celery -A workers.app worker -Q vlm.<model>``) and its settings.

The one place that reads ``CVGL_BROKER_URL``. Unset means the embedded default: kombu's
in-process ``memory://`` transport, served by a worker thread the CLI starts itself.
Results live in the database, so there is no result backend. Imports only ``db`` of ours.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init

from workers.queues import COORDINATION_QUEUE, TASK_ROUTES

BROKER_URL_ENV = "CVGL_BROKER_URL"
# A task that meets a database error (a restart, a lock or statement timeout) retries every second
# or two, for up to ten minutes: once the database is back the run moves within seconds (a long
# exponential backoff would leave it idle for up to the backoff's cap), and the retry takes over
# the first delivery's leases, so an outage spends no attempt (db/leases.py).
DB_RETRY_BACKOFF_MAX = 2
DB_RETRY_MAX = 600
EMBEDDED_BROKER = "memory://localhost/"


def broker_url() -> str:
    return os.environ.get(BROKER_URL_ENV, "").strip() or EMBEDDED_BROKER


def is_embedded() -> bool:
    """True when no broker is configured: the CLI must run the work in-process."""
    return broker_url() == EMBEDDED_BROKER


def visibility_timeout() -> float:
    """Seconds an unacknowledged message waits before Redis redelivers it.

    Must exceed the longest batch (with prefetch 1, one waiting message ages too); tests set it low.
    """
    return float(os.environ.get("CVGL_VISIBILITY_TIMEOUT", "7200"))


def _transport_options() -> dict:
    v = visibility_timeout()
    restore = float(os.environ.get("CVGL_UNACKED_RESTORE_INTERVAL", "10"))
    return {
        "visibility_timeout": v,
        # kombu 5.7: how often expired unacked messages are swept back (default 10 s, every 10th tick).
        "unacked_restore_interval": restore,
        "unacked_restore_throttle": restore,
        # Read a worker's queues in the order given (-Q): a GPU worker's own shard first, the
        # others only when it is empty (workers/queues.py). The default rotates them.
        "queue_order_strategy": "priority",
    }


# The tasks every worker of this app serves, imported when a worker starts (workers/queues.py names
# them). The coordinator's task is defined in orchestrator/tasks.py, the app its workers run.
app = Celery("cvgl", include=["workers.tasks", "workers.retrieval.tasks"])
app.conf.update(
    broker_url=broker_url(),
    # JSON only: pickle would let anyone who can write to Redis run code in the workers.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    # The database holds every result; Celery keeps none.
    task_ignore_result=True,
    result_backend=None,
    # At-least-once delivery: ack after the body ran; a killed child's message is redelivered.
    # Tasks are idempotent (the DB decides what is still pending) and attempts are capped in the DB.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # After a broker blip a late-ack task would otherwise keep running and also be redelivered.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    broker_transport_options=_transport_options(),
    visibility_timeout=visibility_timeout(),
    broker_connection_retry_on_startup=True,
    task_default_queue=COORDINATION_QUEUE,
    task_routes={name: {"queue": queue} for name, queue in TASK_ROUTES.items()},
    task_create_missing_queues=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    # Give late-ack messages a chance to go back to the queue on a warm shutdown.
    worker_soft_shutdown_timeout=float(os.environ.get("CVGL_SOFT_SHUTDOWN_TIMEOUT", "10")),
    worker_hijack_root_logger=False,
)


import workers.control  # noqa: E402,F401  (registers the `inspect gpu` command and the served counter)


@worker_process_init.connect
def _fresh_db_connections(**_kwargs) -> None:
    """A forked child must not reuse the parent's pooled database sockets."""
    from db.engine import dispose_engines

    dispose_engines()
