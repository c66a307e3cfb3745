"""Celery tasks: thin shells that let the database decide what work is left.

A task carries judgment row ids only (JSON). Each delivery leases the pending rows it judges
(``db/leases.py``): a row nobody holds is leased and an attempt counted; a row another live worker
holds is a duplicate delivery, costing no attempt, sent again for when that worker's lease would run
out (done by then, or taken over if it froze); a row whose holder died or froze is
taken again one at a time, so a poison item spends only its own attempts, and failed after
``--max-attempts``. The lease is renewed while the batch runs, results are stored only by the
holder, and the coordinator is told which queries moved. A database error retries the task with
backoff and hands its leases to the retry: an outage spends no attempt.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Sequence

from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import InterfaceError, OperationalError

from db import leases
from db.engine import session_factory
from db.queries import JUDGMENT_MODELS, RunInfo, record_outcomes
from workers.app import DB_RETRY_BACKOFF_MAX, DB_RETRY_MAX, app
from workers.control import record_served
from workers.dispatch import send_judgments
from workers.inputs import JudgmentInput, judgment_inputs
from workers.judges.base import JudgeRequest
from workers.judging import Item, Outcome, failed, resolve_image, run_batch
from workers.prompts import load_prompt
from workers.queues import ADVANCE_TASK, COORDINATION_QUEUE, JUDGE_PAIRWISE_TASK, JUDGE_POINTWISE_TASK
from workers.runtime import get_judge, loaded_judges

log = logging.getLogger(__name__)

# A database blip (PostgreSQL restart, a lock or statement timeout) must not drop the batch.
_DB_ERRORS = (OperationalError, InterfaceError)
MAX_HANDED_LEASES = 4  # holders a retried task may take leases over from


def validate_ids(ids: object) -> list[int]:
    """A task payload must be a non-empty list of positive integer row ids."""
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i > 0 for i in ids):
        raise Reject(
            f"malformed judgment task payload: expected a list of row ids, got {ids!r:.200}", requeue=False
        )
    return ids


def _holders(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise Reject(
            f"malformed judgment task payload: holders must be a list of names, got {value!r:.200}",
            requeue=False,
        )
    return value[-MAX_HANDED_LEASES:]


class JudgmentTask(Task):
    max_retries = DB_RETRY_MAX

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """A batch stopped at its time limit (a hung GPU) is sent again at once: its judgments are
        then taken one at a time, as after a crash."""
        if isinstance(exc, TimeLimitExceeded) and args:
            try:
                resend(self.name.rsplit("_", 1)[-1], validate_ids(args[0]))
            except Exception:  # reconcile (resume, submit --wait) sends it again later
                log.exception("could not send the judgments of task %s again", task_id)


@app.task(name=JUDGE_PAIRWISE_TASK, base=JudgmentTask, bind=True)
def judge_pairwise(self: Task, ids: list[int], holders: list[str] | None = None) -> int:
    """Judge pending pairwise verdicts by id. Returns how many this delivery stored."""
    return _judge_task(self, "pairwise", ids, holders)


@app.task(name=JUDGE_POINTWISE_TASK, base=JudgmentTask, bind=True)
def judge_pointwise(self: Task, ids: list[int], holders: list[str] | None = None) -> int:
    """Judge pending pointwise scores by id. Returns how many this delivery stored."""
    return _judge_task(self, "pointwise", ids, holders)


def _judge_task(task: Task, kind: str, ids: object, holders: object) -> int:
    ids, adopt = validate_ids(ids), _holders(holders)
    try:
        return judge_rows(task, kind, ids, adopt)
    except _DB_ERRORS as exc:
        # Whichever worker runs the retry takes over this process's leases: no attempt is spent.
        handed = list(dict.fromkeys([*adopt, leases.holder()]))[-MAX_HANDED_LEASES:]
        countdown = get_exponential_backoff_interval(1, task.request.retries, DB_RETRY_BACKOFF_MAX, True)
        raise task.retry(exc=exc, kwargs={"holders": handed}, countdown=countdown) from exc


def worker_name(task: Task) -> str:
    return getattr(task.request, "hostname", None) or socket.gethostname()


def judge_rows(task: Task, kind: str, ids: Sequence[int], adopt: Sequence[str] = ()) -> int:
    sessions = session_factory()
    worker = worker_name(task)
    me = leases.holder()
    table = JUDGMENT_MODELS[kind].__table__
    runs: dict[int, RunInfo | None] = {}
    by_run: dict[int, list[JudgmentInput]] = defaultdict(list)
    claims: dict[int, leases.Claim] = {}
    with sessions.begin() as s:
        for inp in judgment_inputs(s, kind, ids, runs):
            by_run[inp.run_id].append(inp)
        for run_id, group in by_run.items():
            info = runs[run_id]
            claims[run_id] = leases.claim(
                s,
                table,
                [i.lease for i in group],
                me=me,
                max_attempts=info.max_attempts,
                give_up=_give_up(info),
                adopt=adopt,
                extra={"worker": worker},
            )
    stored = 0
    with leases.LeaseKeeper(sessions, table, me) as keeper:
        for run_id, group in by_run.items():
            info, claimed = runs[run_id], claims[run_id]
            if claimed.spent:
                log.error(
                    "abandoned %d %s judgments of run %d: %s",
                    len(claimed.spent),
                    kind,
                    run_id,
                    _give_up(info),
                )
            if claimed.busy:
                # A duplicate: asked again when the holder's lease would run out (done by then, or
                # taken over if the holder froze; this copy may be the only one left of its batch).
                wait = claimed.defer_seconds()
                busy = set(claimed.busy)
                try:
                    send_judgments(
                        info,
                        kind,
                        [(i.id, i.query_id) for i in group if i.id in busy],
                        countdown=wait,
                        sessions=sessions,
                    )
                except Exception:  # the broker is down: reconcile sends them again
                    log.exception("could not defer %d duplicate judgments", len(busy))
                log.info(
                    "%d %s judgments of run %d are being judged elsewhere: duplicate delivery deferred %.0f s",
                    len(busy),
                    kind,
                    run_id,
                    wait,
                )
            held = set(claimed.held)
            batch = [i for i in group if i.id in held]
            if batch:
                stored += _judge_held(sessions, keeper, kind, info, batch, worker, me)
            recovered = set(claimed.recovered)
            for inp in (i for i in group if i.id in recovered):
                # Its last holder died or froze: alone, so a poison item spends only its own attempts.
                with sessions.begin() as s:
                    taken = leases.take_one(
                        s,
                        table,
                        inp.id,
                        me=me,
                        max_attempts=info.max_attempts,
                        give_up=_give_up(info),
                        extra={"worker": worker},
                    )
                if taken:
                    stored += _judge_held(sessions, keeper, kind, info, [inp], worker, me)
            moved = held | recovered | set(claimed.spent)
            if moved:
                _notify_coordinator(run_id, sorted({i.query_id for i in group if i.id in moved}))
    record_served(stored, [_judge_status(j) for j in loaded_judges()])
    return stored


def _give_up(info: RunInfo) -> str:
    return f"gave up after {info.max_attempts} attempts: each time, its worker died or froze while judging it"


def _judge_held(
    sessions,
    keeper: leases.LeaseKeeper,
    kind: str,
    info: RunInfo,
    inputs: list[JudgmentInput],
    worker: str,
    me: str,
) -> int:
    """Judge leased rows while the keeper renews their leases; store what this process still holds."""
    ids = [i.id for i in inputs]
    keeper.hold(ids)
    try:
        return _judge_and_store(sessions, kind, info, inputs, worker, me)
    finally:
        keeper.release(ids)


def resend(kind: str, ids: Sequence[int]) -> int:
    """Send the pending judgments of a batch stopped at its time limit again, each as its own task:
    each then gets the time limit of one judgment."""
    sessions = session_factory()
    runs: dict[int, RunInfo | None] = {}
    with sessions() as s:
        by_run: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for inp in judgment_inputs(s, kind, ids, runs):
            by_run[inp.run_id].append((inp.id, inp.query_id))
    return sum(
        send_judgments(runs[r], kind, rows, batch_size=1, sessions=sessions) for r, rows in by_run.items() if runs.get(r)
    )


def _judge_status(judge) -> dict:
    """What ``inspect gpu`` shows of a loaded judge: name, model, revision, and for VLM judges their
    caches' hit counts and the work per prefix level (``HFVisionJudge.stats``)."""
    status = {"judge": judge.name, "model": judge.model, "revision": judge.revision}
    stats = getattr(judge, "stats", None)
    if callable(stats):
        status["stats"] = stats()
    return status


def _judge_and_store(
    sessions, kind: str, info: RunInfo, inputs: list[JudgmentInput], worker: str, me: str
) -> int:
    ids = [i.id for i in inputs]
    prompt = load_prompt(info.prompt_name)
    revision = info.model_revision
    try:
        judge = get_judge(info.judge, info.model, info.model_revision, info.params.get("judge_options", {}))
        revision = judge.revision
    except Exception as exc:  # a model that cannot load is a recorded failure, not a silent stall
        log.exception("cannot load judge %s %s", info.judge, info.model)
        outcomes = [
            failed(i, f"cannot load judge {info.judge} {info.model}: {type(exc).__name__}: {exc}")
            for i in ids
        ]
    else:
        items, outcomes = [], []
        for inp in inputs:
            try:
                items.append(Item(inp.id, _request(info, prompt.text, inp)))
            except ValueError as exc:
                outcomes.append(failed(inp.id, str(exc)))
        outcomes.extend(run_batch(judge, prompt, items, decode=info.params.get("decode", "choices")))
    with sessions.begin() as s:
        return record_outcomes(
            s, kind, [o.row() for o in outcomes], worker=worker, model_revision=revision, holder=me
        )


def _request(info: RunInfo, prompt_text: str, inp: JudgmentInput) -> JudgeRequest:
    problem = inp.problem()
    if problem:
        raise ValueError(problem)
    images = (resolve_image(info.dataset_root, inp.query_path),) + tuple(
        resolve_image(info.dataset_root, p) for p in inp.tile_paths
    )
    context = {
        "query": inp.query_name,
        "tiles": inp.tile_names,
        "positive": inp.positive,
        "stage1_rank": inp.stage1_rank,
    }
    return JudgeRequest(prompt=prompt_text, images=images, context=context)


def _notify_coordinator(run_id: int, query_ids: list[int]) -> None:
    """Ask the coordinator to advance these queries; if the broker is down, reconcile will."""
    try:
        app.send_task(ADVANCE_TASK, args=[run_id, query_ids], queue=COORDINATION_QUEUE)
    except Exception:  # the verdicts are stored; a stalled run is reconciled from the DB
        log.exception("could not notify the coordinator for run %d", run_id)


__all__ = ["judge_pairwise", "judge_pointwise", "Outcome"]
