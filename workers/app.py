"""The Celery app (``celery -A workers.app worker -Q vlm.<model>``) and its settings.

The broker comes from the settings (``CVGL_BROKER_URL`` or ``--broker-url``). Unset means the
embedded default: kombu's in-process ``memory://`` transport, served by a worker thread the CLI
starts itself. Results live in the database, so there is no result backend. Imports only ``db`` of
ours. The settings are read when Celery first needs its configuration, not at import: a bad
``CVGL_*`` value is then reported by the command that reads it, not as an import traceback.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from db.settings import Settings, settings
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
    return settings().broker_url or EMBEDDED_BROKER


def is_embedded() -> bool:
    """True when no broker is configured: the CLI must run the work in-process."""
    return broker_url() == EMBEDDED_BROKER


def visibility_timeout() -> float:
    """Seconds an unacknowledged message waits before Redis redelivers it.

    Must exceed the longest batch (with prefetch 1, one waiting message ages too); tests set it low.
    """
    return settings().visibility_timeout


def _from_settings(s: Settings) -> dict:
    """The part of the Celery configuration the settings decide."""
    restore = s.unacked_restore_interval
    transport = {
        "visibility_timeout": s.visibility_timeout,
        # kombu 5.7: how often expired unacked messages are swept back (default 10 s, every 10th tick).
        "unacked_restore_interval": restore,
        "unacked_restore_throttle": restore,
        # Read a worker's queues in the order given (-Q): a GPU worker's own shard first, the
        # others only when it is empty (workers/queues.py). The default rotates them.
        "queue_order_strategy": "priority",
    }
    return {
        "broker_url": s.broker_url or EMBEDDED_BROKER,
        "broker_transport_options": transport,
        "visibility_timeout": s.visibility_timeout,
        # Give late-ack messages a chance to go back to the queue on a warm shutdown.
        "worker_soft_shutdown_timeout": s.soft_shutdown_timeout,
    }


# The tasks every worker of this app serves, imported when a worker starts (workers/queues.py names
# them). The coordinator's task is defined in orchestrator/tasks.py, the app its workers run.
app = Celery("cvgl", include=["workers.tasks", "workers.retrieval.tasks", "workers.training.tasks"])
app.conf.update(
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
    broker_connection_retry_on_startup=True,
    task_default_queue=COORDINATION_QUEUE,
    task_routes={name: {"queue": queue} for name, queue in TASK_ROUTES.items()},
    task_create_missing_queues=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)


@app.on_configure.connect
def _configure_from_settings(sender: Celery, **_kwargs) -> None:
    sender.conf.update(_from_settings(settings()))


def use_current_settings() -> None:
    """Point an already configured app at the broker the settings name now: the CLI calls it
    after its options, and one process (a test) may run commands against different brokers."""
    if not app.configured:
        return  # the on_configure hook reads the settings when the configuration is first needed
    wanted = _from_settings(settings())
    if all(app.conf.get(k) == v for k, v in wanted.items()):
        return
    app.conf.update(wanted)
    app._after_fork()  # drops the connection and producer pools opened for the old broker


import workers.control  # noqa: E402,F401  (registers the `inspect gpu` command and the served counter)


@worker_process_init.connect
def _fresh_db_connections(**_kwargs) -> None:
    """A forked child must not reuse the parent's pooled database sockets."""
    from db.engine import dispose_engines

    dispose_engines()
