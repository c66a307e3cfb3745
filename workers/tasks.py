"""Celery tasks: thin shells that let the database decide what work is left.

A task carries judgment row ids only (JSON). It skips rows no longer pending, counts an attempt
before judging (so a crash counts), gives up on rows whose attempts are spent, judges the rest
in one batch, stores every outcome once and tells the coordinator which queries moved.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Sequence

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import InterfaceError, OperationalError

from db.engine import session_factory
from db.queries import RunInfo, abandon, claim, record_outcomes
from workers.app import app
from workers.control import record_served
from workers.inputs import JudgmentInput, judgment_inputs
from workers.judges.base import JudgeRequest
from workers.judging import Item, Outcome, failed, resolve_image, run_batch
from workers.prompts import load_prompt
from workers.queues import COORDINATION_QUEUE
from workers.runtime import get_judge, loaded_judges

log = logging.getLogger(__name__)

ADVANCE_TASK = "cvgl.advance"
# A database blip (PostgreSQL restart) must not drop the batch: retry with backoff.
_DB_ERRORS = (OperationalError, InterfaceError)


def validate_ids(ids: object) -> list[int]:
    """A task payload must be a non-empty list of positive integer row ids."""
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i > 0 for i in ids):
        raise Reject(
            f"malformed judgment task payload: expected a list of row ids, got {ids!r:.200}", requeue=False
        )
    return ids


class JudgmentTask(Task):
    autoretry_for = _DB_ERRORS
    retry_backoff = 1
    retry_backoff_max = 30
    retry_jitter = True
    max_retries = 50


@app.task(name="cvgl.judge_pairwise", base=JudgmentTask, bind=True)
def judge_pairwise(self: Task, ids: list[int]) -> int:
    """Judge pending pairwise verdicts by id. Returns how many this delivery stored."""
    return judge_rows(self, "pairwise", validate_ids(ids))


@app.task(name="cvgl.judge_pointwise", base=JudgmentTask, bind=True)
def judge_pointwise(self: Task, ids: list[int]) -> int:
    """Judge pending pointwise scores by id. Returns how many this delivery stored."""
    return judge_rows(self, "pointwise", validate_ids(ids))


def worker_name(task: Task) -> str:
    return getattr(task.request, "hostname", None) or socket.gethostname()


def judge_rows(task: Task, kind: str, ids: Sequence[int]) -> int:
    sessions = session_factory()
    worker = worker_name(task)
    runs: dict[int, RunInfo | None] = {}
    with sessions.begin() as s:
        inputs = judgment_inputs(s, kind, ids, runs)
        # First delivery (the common case): count the attempt in the same transaction.
        first_delivery = all(i.attempts == 0 for i in inputs)
        if inputs and first_delivery:
            claim(s, kind, [i.id for i in inputs], worker)
    if not inputs:
        return 0
    stored = 0
    by_run: dict[int, list[JudgmentInput]] = defaultdict(list)
    for inp in inputs:
        by_run[inp.run_id].append(inp)
    for run_id, group in by_run.items():
        info = runs[run_id]
        spent = [i.id for i in group if i.attempts >= info.max_attempts]
        live = [i for i in group if i.attempts < info.max_attempts]
        if spent:
            with sessions.begin() as s:
                abandon(
                    s,
                    kind,
                    spent,
                    f"gave up after {info.max_attempts} attempts: the worker died while judging it",
                )
            log.error(
                "abandoned %d %s judgments of run %d after %d attempts",
                len(spent),
                kind,
                run_id,
                info.max_attempts,
            )
        if not first_delivery:
            # A redelivery after a crash: judge one at a time so a poison item spends only its own attempts.
            for inp in live:
                stored += _judge_and_store(sessions, kind, info, [inp], worker, claimed=False)
        elif live:
            stored += _judge_and_store(sessions, kind, info, live, worker, claimed=True)
        _notify_coordinator(run_id, sorted({i.query_id for i in group}))
    record_served(stored, [_judge_status(j) for j in loaded_judges()])
    return stored


def _judge_status(judge) -> dict:
    """What ``inspect gpu`` shows of a loaded judge: name, model, revision, and for VLM judges their
    caches' hit counts and the work per prefix level (``HFVisionJudge.stats``)."""
    status = {"judge": judge.name, "model": judge.model, "revision": judge.revision}
    stats = getattr(judge, "stats", None)
    if callable(stats):
        status["stats"] = stats()
    return status


def _judge_and_store(
    sessions, kind: str, info: RunInfo, inputs: list[JudgmentInput], worker: str, claimed: bool
) -> int:
    ids = [i.id for i in inputs]
    if not claimed:
        with sessions.begin() as s:
            claim(s, kind, ids, worker)
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
        return record_outcomes(s, kind, [o.row() for o in outcomes], worker=worker, model_revision=revision)


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
