"""Retrieval tasks on the ``retrieval`` queue: embed one shard; rank the queries once all are embedded.

``cvgl.embed_shard(shard_id)`` skips a shard that is no longer pending (stored shards are never
recomputed) or that another live worker holds the lease of (``db/leases.py``: a duplicate delivery
costs nothing), leases it (an attempt), embeds the shard's images with the process's encoder, writes the
float16 file and marks the shard done; the delivery that leaves no shard pending sends
``cvgl.rank_candidates(run_id)``, which writes the top-K candidate set. A bad checkpoint or an
unknown model fails the whole run with the reason (rerunning the command resets it); a missing
or corrupt image is recorded with its file name and the shard goes on without it.

Importing this module is cheap: torch and timm are loaded on the first task, in the worker
process that runs it (CUDA is not fork-safe).
"""

from __future__ import annotations

import logging
import socket
import time

from celery import Task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from db import leases
from db import retrieval as retrieval_db
from db.engine import session_factory
from db.models import FAILED, PENDING, RETRIEVAL_RUNNING, EmbeddingShard, RetrievalRun
from workers.app import DB_RETRY_BACKOFF_MAX, DB_RETRY_MAX, app
from workers.queues import EMBED_SHARD_TASK, RANK_CANDIDATES_TASK, RETRIEVAL_QUEUE
from workers.retrieval import store

log = logging.getLogger(__name__)

_DB_ERRORS = (OperationalError, InterfaceError)


class RetrievalTask(Task):
    # A database blip must not lose the work: retry with backoff (the DB decides what is left).
    autoretry_for = _DB_ERRORS
    retry_backoff = 1
    retry_backoff_max = DB_RETRY_BACKOFF_MAX
    retry_jitter = True
    max_retries = DB_RETRY_MAX


def _positive_int(value: object, what: str) -> int:
    if type(value) is not int or value <= 0:
        raise Reject(
            f"malformed {what} payload: expected a positive integer id, got {value!r:.200}", requeue=False
        )
    return value


def _worker(task: Task) -> str:
    return getattr(task.request, "hostname", None) or socket.gethostname()


@app.task(name=EMBED_SHARD_TASK, bind=True, max_retries=DB_RETRY_MAX)
def embed_shard(self: Task, shard_id: int, holders: list[str] | None = None) -> dict:
    """Embed one shard of a retrieval run, unless it is stored already (or being embedded elsewhere)."""
    shard_id = _positive_int(shard_id, EMBED_SHARD_TASK)
    adopt = [h for h in (holders or []) if isinstance(h, str)][-4:]
    try:
        return _embed_shard(self, shard_id, adopt)
    except _DB_ERRORS as exc:
        # As for judgments (workers/tasks.py): the retry takes over this process's lease.
        handed = list(dict.fromkeys([*adopt, leases.holder()]))[-4:]
        countdown = get_exponential_backoff_interval(1, self.request.retries, DB_RETRY_BACKOFF_MAX, True)
        raise self.retry(exc=exc, kwargs={"holders": handed}, countdown=countdown) from exc


def _embed_shard(task: Task, shard_id: int, adopt: list[str]) -> dict:
    sessions = session_factory()
    with sessions.begin() as s:
        work = retrieval_db.shard_work(s, shard_id)
    if work is None:
        return {"shard": shard_id, "skipped": "no such shard"}
    if work.status != PENDING:
        return {"shard": shard_id, "skipped": f"already {work.status}"}
    if work.run_status != RETRIEVAL_RUNNING:
        return {"shard": shard_id, "skipped": f"run {work.run_id} is {work.run_status}"}
    worker = _worker(task)
    me = leases.holder()
    table = EmbeddingShard.__table__
    give_up = f"gave up on {work.label} after {work.max_attempts} attempts: each time, its worker died or froze while embedding it"
    lease_args = dict(me=me, max_attempts=work.max_attempts, give_up=give_up)
    with sessions.begin() as s:
        claimed = leases.claim(s, table, [work.lease], adopt=adopt, extra={"worker": worker}, **lease_args)
        if claimed.recovered:  # one shard: taken again at once (an attempt), or failed if spent
            if leases.take_one(s, table, shard_id, extra={"worker": worker}, **lease_args):
                claimed.fresh.append(shard_id)
            elif retrieval_db.shard_status(s, shard_id) == FAILED:
                claimed.spent = [shard_id]
        if claimed.spent:
            retrieval_db.skip_images(s, work, dict.fromkeys(range(len(work.item_ids)), give_up))
    if claimed.spent:
        log.error("%s", give_up)
        _rank_when_embedded(work.run_id)
        return {"shard": shard_id, "failed": True}
    if not claimed.held:
        # A duplicate: asked again when the holder's lease would run out (see workers/tasks.py).
        wait = claimed.defer_seconds()
        app.send_task(EMBED_SHARD_TASK, args=[shard_id], queue=RETRIEVAL_QUEUE, countdown=wait)
        return {"shard": shard_id, "deferred": f"being embedded elsewhere: asked again in {wait:.0f} s"}
    with leases.LeaseKeeper(sessions, table, me) as keeper:
        keeper.hold([shard_id])
        return _embed_held(sessions, work, worker, me)


def _embed_held(sessions, work: retrieval_db.ShardWork, worker: str, me: str) -> dict:
    """Embed a shard this process holds the lease of, and store it."""
    shard_id = work.shard_id
    from workers.retrieval.encoder import CheckpointError, EncoderSpec, UnknownModel, get_encoder

    spec = EncoderSpec(
        model_name=work.model,
        checkpoint=work.checkpoint,
        checkpoint_sha256=work.checkpoint_sha256,
        random_init=work.random_init,
        seed=work.seed,
        img_size=work.img_size,
    )
    try:
        encoder = get_encoder(spec)
        result = encoder.embed_files(work.paths, store.VIEW_OF_KIND[work.kind], batch_size=work.batch_size)
        store.write_shard_file(work.embeddings_dir, work.file_name, result.embeddings)
    except (CheckpointError, UnknownModel) as exc:
        # Every shard would fail the same way: stop the run and say why.
        _fail_run(work.run_id, str(exc))
        return {"shard": shard_id, "run_failed": str(exc)}
    except _DB_ERRORS:
        raise  # retried with backoff by the task
    except Exception as exc:  # out of memory, a CUDA fault, a full disk: no image's fault
        log.exception("embedding %s of retrieval run %d failed", work.label, work.run_id)
        _fail_run(work.run_id, f"{work.label} on {worker}: {type(exc).__name__}: {exc}")
        return {"shard": shard_id, "run_failed": str(exc)}
    with sessions.begin() as s:
        stored = retrieval_db.complete_shard(
            s,
            work,
            n_embedded=result.n_embedded,
            dim=encoder.dim,
            errors=result.errors,
            seconds=result.seconds,
            device=encoder.device_label,
            worker=worker,
            holder=me,
        )
    for msg in result.errors.values():
        log.warning("retrieval run %d skipped an image: %s", work.run_id, msg)
    log.info(
        "%s of retrieval run %d: %d images in %.1f s (%.0f/s) on %s",
        work.label,
        work.run_id,
        len(work.item_ids),
        result.seconds,
        len(work.item_ids) / max(result.seconds, 1e-9),
        encoder.device_label,
    )
    _rank_when_embedded(work.run_id)
    return {"shard": shard_id, "stored": stored, "embedded": result.n_embedded, "skipped": len(result.errors)}


def _fail_run(run_id: int, error: str) -> None:
    with session_factory().begin() as s:
        retrieval_db.fail_run(s, run_id, error)
    log.error("retrieval run %d failed: %s", run_id, error)


def _rank_when_embedded(run_id: int) -> None:
    """The delivery that leaves no shard pending starts the top-K job (a duplicate is harmless)."""
    with session_factory()() as s:
        if retrieval_db.any_pending(s, run_id):
            return
    try:
        app.send_task(RANK_CANDIDATES_TASK, args=[run_id], queue=RETRIEVAL_QUEUE)
    except Exception:  # the shards are stored; rerunning `orchestrator retrieve` sends it again
        log.exception("could not enqueue the top-K job of retrieval run %d", run_id)


@app.task(name=RANK_CANDIDATES_TASK, base=RetrievalTask, bind=True)
def rank_candidates(self: Task, run_id: int) -> dict:
    """Top-K tiles per query over the whole gallery; stores the candidate set and the positives' ranks."""
    run_id = _positive_int(run_id, RANK_CANDIDATES_TASK)
    sessions = session_factory()
    with sessions() as s:
        run = s.get(RetrievalRun, run_id)
        if run is None:
            return {"run": run_id, "skipped": "no such run"}
        if run.status != RETRIEVAL_RUNNING:
            return {"run": run_id, "skipped": f"run is {run.status}"}
        if retrieval_db.any_pending(s, run_id):
            return {"run": run_id, "skipped": "shards still pending"}
        try:
            inp = store.ranking_input(s, run_id)
        except (FileNotFoundError, ValueError) as exc:
            _fail_run(run_id, str(exc))
            return {"run": run_id, "run_failed": str(exc)}
    if len(inp.tile_ids) < inp.k:
        error = (
            f"only {len(inp.tile_ids)} tiles have an embedding, fewer than K={inp.k} "
            "(see the skipped images in the report)"
        )
        _fail_run(run_id, error)
        return {"run": run_id, "run_failed": error}
    if len(inp.query_ids) == 0:
        error = "no query image could be embedded (see the skipped images in the report)"
        _fail_run(run_id, error)
        return {"run": run_id, "run_failed": error}

    from workers.retrieval.encoder import pick_device
    from workers.retrieval.topk import rank_gallery

    start = time.perf_counter()
    try:
        device = pick_device()
        ranked = rank_gallery(inp.queries, inp.tiles, inp.k, inp.positives, inp.semi_positives, device=device)
    except Exception as exc:  # e.g. out of memory: say so instead of leaving the run running
        log.exception("top-K of retrieval run %d failed", run_id)
        _fail_run(run_id, f"top-K on {_worker(self)}: {type(exc).__name__}: {exc}")
        return {"run": run_id, "run_failed": str(exc)}
    rank_seconds = time.perf_counter() - start
    try:
        with sessions.begin() as s:
            cs_id = retrieval_db.store_ranking(
                s,
                inp,
                ranked.indices,
                ranked.scores,
                ranked.positive_rank,
                ranked.hit_rank,
                ranked.positive_score,
                params={"rank_device": str(device), "rank_seconds": round(rank_seconds, 3)},
            )
    except IntegrityError as exc:  # a candidate set of this name appeared meanwhile
        _fail_run(run_id, f"cannot store the candidate set: {exc.orig or exc}")
        return {"run": run_id, "run_failed": str(exc)}
    log.info(
        "retrieval run %d: top-%d of %d tiles for %d queries in %.1f s on %s (candidate set %s)",
        run_id,
        inp.k,
        len(inp.tile_ids),
        len(inp.query_ids),
        rank_seconds,
        device,
        cs_id,
    )
    return {"run": run_id, "candidate_set_id": cs_id}
