"""The queued fine-tune (``cvgl.train`` on ``train.<model>``): one task per adapter, resumable.

The adapter row is a work item (``db/leases.py``): a delivery takes its lease (an attempt), a
duplicate delivery while another live trainer holds it is deferred (it costs nothing), and a
delivery after its holder died or froze takes it again and resumes from the newest checkpoint the
database references (``loop.train``). The lease is renewed while the job runs; every write first
checks it is still held, so a frozen trainer that wakes up stops instead of writing over the one
that took over. After ``max_attempts`` deliveries whose trainer died the adapter is failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import adapters as store
from db import leases
from db.engine import session_factory
from db.models import PENDING, Adapter
from db.work_items import record_sent
from workers.app import DB_RETRY_BACKOFF_MAX, DB_RETRY_MAX, app
from workers.judges.base import JudgeRequest
from workers.judging import resolve_image
from workers.prompts import load_prompt
from workers.queues import TRAIN_TASK
from workers.tasks import MAX_HANDED_LEASES
from workers.training.examples import PairExample, QueryLabels, pair_examples

log = logging.getLogger(__name__)

_DB_ERRORS = (OperationalError, InterfaceError)


class LeaseLost(RuntimeError):
    """Another trainer holds the adapter now (this one froze past its lease): stop writing."""


def send_training(adapter_id: int, queue: str, countdown: float | None = None, sessions: Any = None) -> str:
    """Send the adapter's job, its task id recorded first (``db/work_items.py``)."""
    from celery.utils import uuid

    task_id = uuid()
    with (sessions or session_factory()).begin() as s:
        record_sent(s, Adapter.__table__, {task_id: [adapter_id]})
    app.send_task(TRAIN_TASK, args=[adapter_id], queue=queue, task_id=task_id, countdown=countdown)
    return task_id


class DBTrainingLog:
    """``loop.TrainingLog`` on the database: each write checks this process still holds the lease."""

    def __init__(self, sessions: sessionmaker[Session], adapter_id: int, me: str) -> None:
        self.sessions, self.adapter_id, self.me = sessions, adapter_id, me

    def _held(self, s: Session) -> None:
        holder = s.execute(select(Adapter.leased_by).where(Adapter.id == self.adapter_id)).scalar()
        if holder != self.me:
            raise LeaseLost(f"adapter {self.adapter_id} is held by {holder or 'nobody'} now")

    def step(self, step: int, **figures: float | None) -> None:
        with self.sessions.begin() as s:
            self._held(s)
            store.record_step(s, self.adapter_id, step, **figures)

    def checkpoint(self, step: int, path: str) -> None:
        with self.sessions.begin() as s:
            self._held(s)
            store.record_checkpoint(s, self.adapter_id, step, path)

    def latest_checkpoint(self) -> tuple[int, str] | None:
        with self.sessions() as s:
            return store.latest_checkpoint(s, self.adapter_id)

    def forget_checkpoints(self, steps: Sequence[int]) -> None:
        with self.sessions.begin() as s:
            self._held(s)
            store.forget_checkpoints(s, self.adapter_id, steps)


class TrainTask(Task):
    max_retries = DB_RETRY_MAX


@app.task(name=TRAIN_TASK, base=TrainTask, bind=True)
def train_adapter(self: Task, adapter_id: int, holders: list[str] | None = None) -> str:
    """Train (or resume) adapter ``adapter_id``. Returns what this delivery did."""
    if type(adapter_id) is not int or adapter_id < 1:
        raise Reject(
            f"malformed training task payload: expected an adapter id, got {adapter_id!r:.200}", requeue=False
        )
    adopt = [h for h in (holders or []) if isinstance(h, str)][-MAX_HANDED_LEASES:]
    try:
        return run_job(self, adapter_id, adopt)
    except _DB_ERRORS as exc:
        # Whichever worker runs the retry takes over this process's lease: no attempt is spent.
        handed = list(dict.fromkeys([*adopt, leases.holder()]))[-MAX_HANDED_LEASES:]
        countdown = get_exponential_backoff_interval(1, self.request.retries, DB_RETRY_BACKOFF_MAX, True)
        raise self.retry(exc=exc, kwargs={"holders": handed}, countdown=countdown) from exc


def run_job(task: Task, adapter_id: int, adopt: Sequence[str] = ()) -> str:
    sessions = session_factory()
    me = leases.holder()
    worker = getattr(task.request, "hostname", None) or "trainer"
    table = Adapter.__table__
    with sessions.begin() as s:
        row = s.execute(
            select(
                table.c.id,
                table.c.attempts,
                table.c.leased_by,
                table.c.lease_until,
                table.c.max_attempts,
                table.c.queue,
            ).where(table.c.id == adapter_id, table.c.status == PENDING)
        ).first()
        if row is None:
            return "nothing to do"  # done, failed, or deleted: a late duplicate
        give_up = f"gave up after {row.max_attempts} attempts: each time, its trainer died or froze"
        claimed = leases.claim(
            s, table, [row[:4]], me=me, max_attempts=row.max_attempts, give_up=give_up, adopt=adopt,
            extra={"worker": worker},
        )  # fmt: skip
    if claimed.busy:
        wait = claimed.defer_seconds()
        send_training(adapter_id, row.queue, countdown=wait, sessions=sessions)
        log.info(
            "adapter %d is being trained elsewhere: duplicate delivery deferred %.0f s", adapter_id, wait
        )
        return "deferred"
    if claimed.spent:
        log.error("adapter %d: %s", adapter_id, give_up)
        return "failed"
    if claimed.recovered:
        with sessions.begin() as s:
            taken = leases.take_one(
                s,
                table,
                adapter_id,
                me=me,
                max_attempts=row.max_attempts,
                give_up=give_up,
                extra={"worker": worker},
            )
        if not taken:
            return "taken elsewhere"
    with leases.LeaseKeeper(sessions, table, me) as keeper:
        keeper.hold([adapter_id])
        try:
            result = _train(sessions, adapter_id, me)
        except LeaseLost as exc:
            log.warning("stopped training adapter %d: %s", adapter_id, exc)
            return "lease lost"
        except _DB_ERRORS:
            raise
        except Exception as exc:  # a bad model or image: a recorded failure, not a silent stall
            log.exception("training adapter %d failed", adapter_id)
            with sessions.begin() as s:
                store.fail_adapter(s, adapter_id, me, f"{type(exc).__name__}: {exc}")
            return "failed"
    with sessions.begin() as s:
        finished = store.finish_adapter(s, adapter_id, me, result.sha256, result.base_revision)
    if not finished:
        log.warning("adapter %d was trained, but another trainer holds it now: its result stands", adapter_id)
        return "lease lost"
    log.info(
        "adapter %d done: %s (validation accuracy %s)", adapter_id, result.adapter_dir, result.val_accuracy
    )
    return "done"


def _train(sessions: sessionmaker[Session], adapter_id: int, me: str) -> Any:
    from workers.training import loop  # torch and transformers: loaded only by training workers

    with sessions() as s:
        adapter = s.get(Adapter, adapter_id)
        assert adapter is not None
        train_ids = set(store.adapter_query_ids(s, adapter_id, "train"))
        val_ids = set(store.adapter_query_ids(s, adapter_id, "val"))
        labeled = store.labeled_queries(s, adapter.candidate_set_id, train_ids | val_ids)
        inputs = store.training_inputs(s, adapter, labeled)
        name = adapter.name
        params, judge_name = dict(adapter.params), adapter.judge
        base_model, base_revision = adapter.base_model, params.get("revision")
        total_steps, output_dir = adapter.total_steps, Path(adapter.output_dir)
    labels = [QueryLabels(x.query_id, x.name, x.positive, x.semi_positives, x.candidates) for x in labeled]
    config = loop.TrainConfig.from_params(params)
    negatives = int(params.get("negatives", 3))
    train = pair_examples(
        [x for x in labels if x.query_id in train_ids],
        negatives,
        params.get("both_orders", False),
        config.seed,
    )
    # Validation always shows both orders: a judge that always answers "1" scores 50%.
    val = pair_examples([x for x in labels if x.query_id in val_ids], negatives, True, config.seed)
    prompt = load_prompt("pairwise")

    def example(e: PairExample) -> Any:
        images = (
            resolve_image(inputs.root, inputs.query_paths[e.query_id]),
            resolve_image(inputs.root, inputs.tile_paths[e.first]),
            resolve_image(inputs.root, inputs.tile_paths[e.second]),
        )
        return loop.Example(JudgeRequest(prompt.text, images, prompt.spec.answer_prefix), e.answer)

    judge = loop.load_base(judge_name, base_model, base_revision)
    metadata = {"adapter": name, "judge": judge_name, "base_model": base_model,
                "train_queries": len(train_ids), "val_queries": len(val_ids), "examples": len(train)}  # fmt: skip
    return loop.train(
        judge, judge_name, config, [example(e) for e in train], [example(e) for e in val], total_steps,
        output_dir, DBTrainingLog(sessions, adapter_id, me), metadata,
    )  # fmt: skip
