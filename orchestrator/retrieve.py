"""Stage 1 as queued jobs: create (or resume) a retrieval run, enqueue its shards, follow them.

A retrieval run embeds every satellite tile of a dataset (the gallery: all tiles of the ingested
cities) and every query panorama, in shards of ``shard_size`` images; each shard is one
``cvgl.embed_shard`` task on the ``retrieval`` queue and one float16 .npy file. When no shard is
left pending, a worker runs ``cvgl.rank_candidates``, which stores the top-K tiles per query as a
candidate set named like the run (``source='retrieval'``) that ``submit --candidates NAME``
reranks. Running the same command again resumes: stored shards are kept, stale ones sent again.

Imports ``db`` and the torch-free parts of ``workers``; tasks are sent by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.utils import uuid
from sqlalchemy.orm import Session, sessionmaker

from db import retrieval as retrieval_db
from db.datasets import datasets
from db.models import (
    DONE,
    FAILED,
    RETRIEVAL_DONE,
    RETRIEVAL_FAILED,
    RETRIEVAL_RUNNING,
    Dataset,
    EmbeddingShard,
    RetrievalRun,
)
from db.queries import candidate_set_named
from db.reports import retrieval_recall
from db.retrieval import QUERY, TILE
from db.work_items import record_sent, stale_shards
from orchestrator.progress import BarState, follow
from workers.app import app
from workers.dispatch import queued_task_ids
from workers.queues import EMBED_SHARD_TASK, RANK_CANDIDATES_TASK, RETRIEVAL_QUEUE
from workers.retrieval.store import (
    DEFAULT_IMG_SIZE,
    DEFAULT_MODEL,
    embeddings_root,
    file_sha256,
    run_folder_name,
)

DEFAULT_K = 20
DEFAULT_BATCH_SIZE = 128  # Sample4Geo's evaluation batch
DEFAULT_SHARD_SIZE = 4096  # about 2 s of ConvNeXt-B on an H200: the per-shard start-up cost is noise
MIN_IMG_SIZE = 32  # ConvNeXt downsamples by 32


class RetrieveError(ValueError):
    """Bad options or a name clash: nothing was stored."""


class RetrievalFailed(RuntimeError):
    """The run stopped for a reason a worker recorded (bad checkpoint, unknown model, ...)."""


@dataclass(frozen=True)
class RetrieveSpec:
    name: str
    checkpoint: Path | None = None
    random_init: bool = False
    model: str = DEFAULT_MODEL
    k: int = DEFAULT_K
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    img_size: int = DEFAULT_IMG_SIZE
    seed: int = 0
    dataset: str | None = None
    max_attempts: int = 3


@dataclass(frozen=True)
class Prepared:
    run_id: int
    created: bool
    status: str
    shards: int
    reset_shards: int


def pick_dataset(s: Session, dataset: str | None) -> Dataset:
    found = datasets(s, dataset)
    if dataset:
        if len(found) != 1:
            raise RetrieveError(f"dataset {dataset!r} is {'ambiguous' if found else 'not ingested'}")
        return found[0]
    if not found:
        raise RetrieveError("no dataset ingested; run `orchestrator ingest DIR` first")
    if len(found) > 1:
        raise RetrieveError(
            "several datasets are ingested; choose one with --dataset: " + ", ".join(d.root for d in found)
        )
    return found[0]


def _validate(spec: RetrieveSpec) -> None:
    if not spec.name.strip():
        raise RetrieveError("--name must not be empty")
    if spec.checkpoint is not None and spec.random_init:
        raise RetrieveError("give either --checkpoint or --random-init, not both")
    if spec.checkpoint is None and not spec.random_init:
        raise RetrieveError(
            "no --checkpoint given: pass a Sample4Geo checkpoint (e.g. weights_e40_0.6109.pth), or "
            "--random-init to embed with untrained weights (the run is marked as such)"
        )
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise RetrieveError(f"checkpoint {spec.checkpoint} does not exist")
    for option, value, low in (
        ("--k", spec.k, 1),
        ("--batch-size", spec.batch_size, 1),
        ("--shard-size", spec.shard_size, 1),
        ("--img-size", spec.img_size, MIN_IMG_SIZE),
        ("--max-attempts", spec.max_attempts, 1),
    ):
        if value < low:
            raise RetrieveError(f"{option} must be at least {low}, got {value}")


def _settings(
    spec: RetrieveSpec, dataset_id: int, checkpoint: str | None, n_tiles: int, n_queries: int
) -> dict:
    """What fixes a run's embeddings and candidates: a resumed run must match all of it."""
    return {
        "dataset": dataset_id,
        "model": spec.model,
        "checkpoint": checkpoint,
        "random_init": spec.random_init,
        "seed": spec.seed,
        "img_size": spec.img_size,
        "k": spec.k,
        "shard_size": spec.shard_size,
        "tiles": n_tiles,
        "queries": n_queries,
    }


def _stored_settings(run: RetrievalRun) -> dict:
    return {
        "dataset": run.dataset_id,
        "model": run.model,
        "checkpoint": run.checkpoint,
        "random_init": run.random_init,
        "seed": run.seed,
        "img_size": run.img_size,
        "k": run.k,
        "shard_size": run.shard_size,
        "tiles": run.n_tiles,
        "queries": run.n_queries,
    }


def create_or_resume(s: Session, spec: RetrieveSpec) -> Prepared:
    """Store a new run and its shards, or check that an existing one of this name has the same settings.

    Raises:
        RetrieveError: bad options, no dataset, a candidate set of this name from elsewhere, or a
            stored run of this name with other settings.
    """
    _validate(spec)
    dataset = pick_dataset(s, spec.dataset)
    tile_ids, query_ids = retrieval_db.dataset_items(s, dataset.id)
    if not tile_ids or not query_ids:
        raise RetrieveError(f"dataset {dataset.root} has {len(tile_ids)} tiles and {len(query_ids)} queries")
    if spec.k > len(tile_ids):
        raise RetrieveError(f"--k {spec.k} exceeds the {len(tile_ids)} tiles of the gallery")
    checkpoint = str(Path(spec.checkpoint).expanduser().resolve()) if spec.checkpoint else None
    wanted = _settings(spec, dataset.id, checkpoint, len(tile_ids), len(query_ids))
    run = retrieval_db.run_by_name(s, spec.name)
    other_set = candidate_set_named(s, spec.name)
    if other_set is not None and (run is None or run.candidate_set_id != other_set.id):
        raise RetrieveError(
            f"a candidate set named {spec.name!r} already exists ({other_set.source}); choose another --name"
        )
    sha = file_sha256(checkpoint) if checkpoint else None
    if run is not None:
        return _resume(s, run, spec, wanted, sha)
    run = RetrievalRun(
        name=spec.name,
        dataset_id=dataset.id,
        model=spec.model,
        checkpoint=checkpoint,
        checkpoint_sha256=sha,
        random_init=spec.random_init,
        seed=spec.seed,
        img_size=spec.img_size,
        k=spec.k,
        batch_size=spec.batch_size,
        shard_size=spec.shard_size,
        max_attempts=spec.max_attempts,
        n_tiles=len(tile_ids),
        n_queries=len(query_ids),
        embeddings_dir="",
        params={},
    )
    s.add(run)
    s.flush()
    run.embeddings_dir = str((embeddings_root() / run_folder_name(run.id, spec.name)).resolve())
    shards = [
        {
            "retrieval_run_id": run.id,
            "kind": kind,
            "shard_index": i,
            "item_ids": ids[lo : lo + spec.shard_size],
            "n_items": len(ids[lo : lo + spec.shard_size]),
        }
        for kind, ids in ((TILE, tile_ids), (QUERY, query_ids))
        for i, lo in enumerate(range(0, len(ids), spec.shard_size))
    ]
    retrieval_db.add_shards(s, shards)
    return Prepared(run.id, created=True, status=run.status, shards=len(shards), reset_shards=0)


def _resume(s: Session, run: RetrievalRun, spec: RetrieveSpec, wanted: dict, sha: str | None) -> Prepared:
    stored = _stored_settings(run)
    differ = [f"{k}: stored {stored[k]!r}, now {wanted[k]!r}" for k in wanted if stored[k] != wanted[k]]
    if differ:
        raise RetrieveError(
            f"retrieval run {run.name!r} exists with other settings ({'; '.join(differ)}); "
            "rerun with the same options to resume it, or choose another --name"
        )
    n_shards = retrieval_db.count_shards(s, run.id)
    if run.status == RETRIEVAL_DONE:
        return Prepared(run.id, created=False, status=run.status, shards=n_shards, reset_shards=0)
    if sha != run.checkpoint_sha256:
        done = retrieval_db.count_shards(s, run.id, DONE)
        if done:
            raise RetrieveError(
                f"checkpoint {run.checkpoint} changed since {done} shards of {run.name!r} were embedded; "
                "choose another --name (shards must not mix weights)"
            )
        run.checkpoint_sha256 = sha
    run.batch_size = spec.batch_size  # throughput only: may change between attempts
    run.max_attempts = spec.max_attempts
    reset = retrieval_db.reset_failed(s, run.id) if run.status == RETRIEVAL_FAILED else 0
    s.flush()
    return Prepared(
        run.id,
        created=False,
        status=retrieval_db.run_status(s, run.id),
        shards=n_shards,
        reset_shards=reset,
    )


def enqueue(sf: sessionmaker[Session], run_id: int) -> int:
    """Send the run's stale shards to the retrieval queue (after the commit that created them).

    Stale, as for judgments (``db/work_items.py``): pending, not being embedded under a live lease,
    and whose last message the broker no longer holds; so a rerun or a stalled wait sends again
    only what was lost, never work queued or in progress. With no shard pending, send the top-K
    job instead. Returns the number of shards sent.
    """
    with sf() as s:
        status, pending = retrieval_db.run_status(s, run_id), retrieval_db.any_pending(s, run_id)
        ids = stale_shards(s, run_id, lambda: queued_task_ids([RETRIEVAL_QUEUE]))
    if status != RETRIEVAL_RUNNING:
        return 0
    tasks = {uuid(): shard_id for shard_id in ids}
    if tasks:
        with sf.begin() as s:
            record_sent(s, EmbeddingShard.__table__, {task_id: [i] for task_id, i in tasks.items()})
    for task_id, shard_id in tasks.items():
        app.send_task(EMBED_SHARD_TASK, args=[shard_id], queue=RETRIEVAL_QUEUE, task_id=task_id)
    if not pending:
        app.send_task(RANK_CANDIDATES_TASK, args=[run_id], queue=RETRIEVAL_QUEUE)
    return len(ids)


@dataclass(frozen=True)
class RetrievalProgress:
    run_id: int
    name: str
    status: str
    error: str | None
    random_init: bool
    shards_total: int
    shards_done: int
    shards_failed: int
    images_total: int
    images_embedded: int
    images_skipped: int
    candidate_set_id: int | None

    @property
    def shards_pending(self) -> int:
        return self.shards_total - self.shards_done - self.shards_failed

    def fingerprint(self) -> tuple:
        return (self.status, self.shards_done, self.shards_failed, self.images_skipped)


def retrieval_progress(s: Session, run_id: int) -> RetrievalProgress:
    run = s.get(RetrievalRun, run_id)
    if run is None:
        raise LookupError(f"retrieval run {run_id} does not exist")
    counts, embedded, skipped = retrieval_db.progress_counts(s, run_id)
    return RetrievalProgress(
        run_id=run.id,
        name=run.name,
        status=run.status,
        error=run.error,
        random_init=run.random_init,
        shards_total=sum(counts.values()),
        shards_done=counts[DONE],
        shards_failed=counts[FAILED],
        images_total=run.n_tiles + run.n_queries,
        images_embedded=embedded,
        images_skipped=skipped,
        candidate_set_id=run.candidate_set_id,
    )


def wait_for_retrieval(
    sf: sessionmaker[Session],
    run_id: int,
    *,
    on_stall: Callable[[], object] | None = None,
    stall_seconds: float = 60.0,
    poll: float = 0.25,
    progress_bar: bool = True,
    timeout: float | None = None,
) -> RetrievalProgress:
    """Poll until the run is done, with a bar of shards done; ``on_stall`` when nothing moves.

    Raises:
        RetrievalFailed: the run failed (the worker's reason is the message).
        TimeoutError: after ``timeout`` seconds.
    """

    def finished(p: RetrievalProgress) -> bool:
        if p.status == RETRIEVAL_FAILED:
            raise RetrievalFailed(f"retrieval run {p.name!r} failed: {p.error}")
        return p.status == RETRIEVAL_DONE

    def bar_state(p: RetrievalProgress) -> BarState:
        top_k = p.shards_pending == 0 and p.status == RETRIEVAL_RUNNING
        return BarState(
            p.shards_total,
            p.shards_done + p.shards_failed,
            {"images": p.images_embedded, "skipped": p.images_skipped},
            label=f"retrieve {p.name}: top-K" if top_k else None,
        )

    def read() -> RetrievalProgress:
        with sf() as s:
            return retrieval_progress(s, run_id)

    with sf() as s:
        name = retrieval_progress(s, run_id).name
    return follow(
        read,
        finished=finished,
        fingerprint=lambda p: p.fingerprint(),
        bar_state=bar_state,
        desc=f"retrieve {name}",
        unit="shard",
        on_stall=on_stall,
        stall_seconds=stall_seconds,
        timeout=timeout,
        poll=poll,
        progress_bar=progress_bar,
    )


def run_summary(s: Session, run_id: int) -> dict[str, Any]:
    """The run's whole-gallery metrics (view ``retrieval_recall``); empty until it is ranked."""
    rows = retrieval_recall(s, retrieval_run_ids=[run_id])
    return rows[0] if rows else {}


def describe(p: RetrievalProgress, metrics: dict[str, Any]) -> list[str]:
    """What the CLI prints when a run is done."""
    lines = [
        f"retrieval run {p.name!r} (id {p.run_id}): {p.images_embedded} images embedded, "
        f"{p.images_skipped} skipped{' (file and reason in the table skipped_images)' if p.images_skipped else ''}"
        + (", untrained weights (--random-init)" if p.random_init else "")
    ]
    if metrics:
        lines.append(
            f"candidate set {p.name!r}: top-{metrics['k']} of {metrics['n_gallery']} tiles for "
            f"{metrics['n_queries']} queries; rerank it with `orchestrator submit --candidates {p.name}`"
        )
        lines.append(
            f"R@1 {metrics['recall_at_1']:.2f}  R@5 {metrics['recall_at_5']:.2f}  R@10 {metrics['recall_at_10']:.2f}  "
            f"R@1% (top {metrics['one_percent_k']}) {metrics['recall_at_1pct']:.2f}  "
            f"hit rate {metrics['hit_rate']:.2f}"
        )
    return lines


def run_retrieval(
    sf: sessionmaker[Session], spec: RetrieveSpec, wait: bool, note: Callable[[str], object]
) -> list[str]:
    """``orchestrator retrieve``: store (or resume) the run, send its stale shards and, with ``wait``
    (always, embedded), follow it until the top-K is stored. ``note``: says what is worth a warning
    before the wait. Returns the lines to print.

    Raises:
        RetrieveError, RetrievalFailed.
    """
    from workers.app import is_embedded

    with sf.begin() as s:
        prepared = create_or_resume(s, spec)
    if spec.random_init:
        note(f"warning: --random-init: {spec.name!r} embeds with untrained weights (seed {spec.seed})")
    if not prepared.created and prepared.status != RETRIEVAL_DONE:
        note(f"resuming retrieval run {spec.name!r} (id {prepared.run_id}): stored shards are kept")
    if prepared.status == RETRIEVAL_DONE:
        pass
    elif is_embedded():
        from orchestrator.embedded import embedded_worker

        enqueue(sf, prepared.run_id)  # before the worker starts, as in orchestrator/drive.py
        with embedded_worker([RETRIEVAL_QUEUE]):
            wait_for_retrieval(sf, prepared.run_id)
    else:
        sent = enqueue(sf, prepared.run_id)
        if not wait:
            return [f"retrieval run {spec.name!r} (id {prepared.run_id}): {sent} shards enqueued on `retrieval`"]
        from orchestrator.drive import stall_seconds

        wait_for_retrieval(
            sf, prepared.run_id, on_stall=lambda: enqueue(sf, prepared.run_id), stall_seconds=stall_seconds()
        )
    with sf() as s:
        return describe(retrieval_progress(s, prepared.run_id), run_summary(s, prepared.run_id))
