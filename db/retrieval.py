"""Retrieval runs and their embedding shards in SQL: what a retrieval worker reads and writes, and
what ``orchestrator retrieve`` stores, sends and follows.

Shards are work items (``db/work_items.py``): a shard is embedded by whoever leases it while it is
'pending' (``db/leases.py``) and completed once by an UPDATE guarded by ``status = 'pending'`` and
the lease; its file (``workers/retrieval/store.py``) is written before that UPDATE, so a shard
marked 'done' always has its file, and a 'done' shard is never embedded again.
Imports only ``db`` modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Row, Table, delete, func, insert, select, update
from sqlalchemy.orm import Session

from db.models import (
    DONE,
    FAILED,
    PENDING,
    RETRIEVAL_DONE,
    RETRIEVAL_FAILED,
    RETRIEVAL_RUNNING,
    Candidate,
    CandidateSet,
    Dataset,
    EmbeddingShard,
    GroundTruth,
    Query,
    RetrievalQueryRank,
    RetrievalRun,
    SkippedImage,
    Tile,
)
from db.queries import chunked, now
from db.upsert import insert_ignore

# Rows per INSERT executemany off PostgreSQL (SQLAlchemy turns it into multi-row VALUES).
_INSERT_BATCH = 20_000
TILE, QUERY = "tile", "query"
KINDS = (TILE, QUERY)


def shard_file_name(kind: str, shard_index: int) -> str:
    return f"{kind}-{shard_index:05d}.npy"


# ----------------------------------------------------------------------------------------------
# shards (retrieval workers)


@dataclass(frozen=True)
class ShardWork:
    """Everything a worker needs to embed one shard."""

    shard_id: int
    run_id: int
    run_status: str
    kind: str
    shard_index: int
    status: str
    attempts: int
    max_attempts: int
    leased_by: str | None  # the lease (db/leases.py) as read with the shard
    lease_until: datetime | None
    item_ids: tuple[int, ...]
    paths: tuple[str, ...]  # absolute
    relative_paths: tuple[str, ...]
    embeddings_dir: str
    batch_size: int
    model: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_init: bool
    seed: int
    img_size: int

    @property
    def file_name(self) -> str:
        return shard_file_name(self.kind, self.shard_index)

    @property
    def label(self) -> str:
        return f"{self.kind} shard {self.shard_index}"

    @property
    def lease(self) -> tuple[int, int, str | None, datetime | None]:
        return (self.shard_id, self.attempts, self.leased_by, self.lease_until)


def shard_work(s: Session, shard_id: int) -> ShardWork | None:
    row = s.execute(
        select(EmbeddingShard, RetrievalRun, Dataset.root)
        .join(RetrievalRun, RetrievalRun.id == EmbeddingShard.retrieval_run_id)
        .join(Dataset, Dataset.id == RetrievalRun.dataset_id)
        .where(EmbeddingShard.id == shard_id)
    ).first()
    if row is None:
        return None
    shard, run, root = row
    model = Tile if shard.kind == TILE else Query
    ids = [int(i) for i in shard.item_ids]
    paths: dict[int, str] = {}
    for part in chunked(ids):
        paths.update(s.execute(select(model.id, model.path).where(model.id.in_(part))).all())
    missing = [i for i in ids if i not in paths]
    if missing:
        raise LookupError(f"{shard.kind} ids {missing[:5]} of shard {shard.id} no longer exist")
    rel = tuple(paths[i] for i in ids)
    return ShardWork(
        shard_id=shard.id,
        run_id=run.id,
        run_status=run.status,
        kind=shard.kind,
        shard_index=shard.shard_index,
        status=shard.status,
        attempts=shard.attempts,
        max_attempts=run.max_attempts,
        leased_by=shard.leased_by,
        lease_until=shard.lease_until,
        item_ids=tuple(ids),
        paths=tuple(str(Path(root) / p) for p in rel),
        relative_paths=rel,
        embeddings_dir=run.embeddings_dir,
        batch_size=run.batch_size,
        model=run.model,
        checkpoint=run.checkpoint,
        checkpoint_sha256=run.checkpoint_sha256,
        random_init=run.random_init,
        seed=run.seed,
        img_size=run.img_size,
    )


def complete_shard(
    s: Session,
    work: ShardWork,
    *,
    n_embedded: int,
    dim: int,
    errors: dict[int, str],
    seconds: float,
    device: str,
    worker: str,
    holder: str | None = None,
) -> bool:
    """Mark the shard done (once) and record its unreadable images; False if another delivery won
    (or, with ``holder``, if that process no longer holds the shard's lease)."""
    guard = [EmbeddingShard.id == work.shard_id, EmbeddingShard.status == PENDING]
    if holder is not None:
        guard.append(EmbeddingShard.leased_by == holder)
    won = s.execute(
        update(EmbeddingShard)
        .where(*guard)
        .values(
            status=DONE,
            file=work.file_name,
            n_embedded=n_embedded,
            seconds=seconds,
            device=device[:64],
            worker=worker[:255],
            error=None,
            finished_at=now(),
            lease_until=None,
        )
        .returning(EmbeddingShard.id)
    ).first()
    if won is None:
        return False
    skip_images(s, work, {row: msg for row, msg in errors.items()})
    s.execute(
        update(RetrievalRun)
        .where(RetrievalRun.id == work.run_id, RetrievalRun.embed_dim.is_(None))
        .values(embed_dim=dim)
    )
    return True


def skip_images(s: Session, work: ShardWork, errors: dict[int, str]) -> None:
    rows = [
        {
            "retrieval_run_id": work.run_id,
            "kind": work.kind,
            "item_id": work.item_ids[row],
            "path": work.relative_paths[row],
            "error": msg,
        }
        for row, msg in sorted(errors.items())
    ]
    insert_ignore(s, SkippedImage.__table__, rows, key=["retrieval_run_id", "kind", "item_id"])


def give_up_shard(s: Session, work: ShardWork, error: str) -> bool:
    """Fail a shard that keeps killing its worker: its images are recorded as skipped, the run goes on."""
    won = s.execute(
        update(EmbeddingShard)
        .where(EmbeddingShard.id == work.shard_id, EmbeddingShard.status == PENDING)
        .values(status=FAILED, error=error, finished_at=now())
        .returning(EmbeddingShard.id)
    ).first()
    if won is None:
        return False
    skip_images(s, work, dict.fromkeys(range(len(work.item_ids)), error))
    return True


def fail_run(s: Session, run_id: int, error: str) -> bool:
    """Stop a run for a reason no retry fixes (bad checkpoint, unknown model); rerunning resets it."""
    result = s.execute(
        update(RetrievalRun)
        .where(RetrievalRun.id == run_id, RetrievalRun.status == RETRIEVAL_RUNNING)
        .values(status=RETRIEVAL_FAILED, error=error, finished_at=now())
        .returning(RetrievalRun.id)
    )
    return result.first() is not None


def shard_status(s: Session, shard_id: int) -> str | None:
    return s.scalar(select(EmbeddingShard.status).where(EmbeddingShard.id == shard_id))


@dataclass(frozen=True)
class RankingInput:
    run_id: int
    name: str
    dataset_id: int
    k: int
    model: str
    checkpoint: str | None
    random_init: bool
    tile_ids: np.ndarray  # gallery rows with an embedding
    tiles: np.ndarray  # (n_gallery, dim) float16
    query_ids: np.ndarray
    queries: np.ndarray
    positives: np.ndarray  # (n_queries,) gallery row, -1 when the positive has no embedding
    semi_positives: np.ndarray  # (n_queries, m) gallery rows, -1 padded


def store_ranking(
    s: Session,
    inp: RankingInput,
    indices: np.ndarray,
    scores: np.ndarray,
    positive_rank: np.ndarray,
    hit_rank: np.ndarray,
    positive_score: np.ndarray,
    params: dict[str, Any],
) -> int | None:
    """Write the candidate set, its candidates and the positives' ranks; finish the run (once).

    Returns the candidate set id, or None when another delivery finished the run first.
    """
    run = s.scalar(
        select(RetrievalRun)
        .where(RetrievalRun.id == inp.run_id, RetrievalRun.status == RETRIEVAL_RUNNING)
        .with_for_update()
    )
    if run is None or run.candidate_set_id is not None:
        return None
    taken = s.scalar(select(CandidateSet.id).where(CandidateSet.name == inp.name))
    if taken is not None:
        fail_run(s, inp.run_id, f"a candidate set named {inp.name!r} already exists (id {taken})")
        return None
    cs = CandidateSet(
        name=inp.name,
        dataset_id=inp.dataset_id,
        k=inp.k,
        source="retrieval",
        details={
            "retrieval_run_id": inp.run_id,
            "model": inp.model,
            "checkpoint": inp.checkpoint,
            "random_init": inp.random_init,
        },
    )
    s.add(cs)
    s.flush()
    tiles = inp.tile_ids[indices].tolist()  # (n_queries, k) tile ids
    query_ids = inp.query_ids.tolist()
    score_rows = scores.tolist()
    candidates = (
        (cs.id, q, r + 1, t, sc)
        for q, trow, srow in zip(query_ids, tiles, score_rows, strict=True)
        for r, (t, sc) in enumerate(zip(trow, srow, strict=True))
    )
    ranks = (
        (
            inp.run_id,
            q,
            pr if pr >= 0 else None,
            hr if hr >= 0 else None,
            None if np.isnan(ps) else float(ps),
        )
        for q, pr, hr, ps in zip(
            query_ids, positive_rank.tolist(), hit_rank.tolist(), positive_score.tolist(), strict=True
        )
    )
    bulk_insert(
        s, Candidate.__table__, ("candidate_set_id", "query_id", "rank", "tile_id", "score"), candidates
    )
    bulk_insert(
        s,
        RetrievalQueryRank.__table__,
        ("retrieval_run_id", "query_id", "positive_rank", "hit_rank", "positive_score"),
        ranks,
    )
    s.execute(
        update(RetrievalRun)
        .where(RetrievalRun.id == inp.run_id)
        .values(
            status=RETRIEVAL_DONE,
            candidate_set_id=cs.id,
            n_gallery=len(inp.tile_ids),
            error=None,
            finished_at=now(),
            params={**(run.params or {}), **params},
        )
    )
    return cs.id


def bulk_insert(s: Session, table: Table, columns: Sequence[str], rows: Iterable[tuple]) -> None:
    """Insert many new rows in the session's transaction: COPY on PostgreSQL, batched INSERTs elsewhere.

    The full cross-area test is about a million candidate rows; COPY writes them several times
    faster than multi-row INSERT statements.
    """
    if s.get_bind().dialect.name == "postgresql":
        cursor = s.connection().connection.driver_connection.cursor()
        with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(dict(zip(columns, row, strict=True)))
        if len(batch) >= _INSERT_BATCH:
            s.execute(insert(table), batch)
            batch = []
    if batch:
        s.execute(insert(table), batch)


def reset_failed(s: Session, run_id: int) -> int:
    """Give a failed run another go (the user ran the command again); returns the shards revived.

    Given-up shards become pending again and their images are no longer counted as skipped;
    every shard not done starts from zero attempts, since a run-level failure (a bad checkpoint)
    was no shard's fault.
    """
    failed = s.scalars(
        select(EmbeddingShard).where(
            EmbeddingShard.retrieval_run_id == run_id, EmbeddingShard.status == FAILED
        )
    ).all()
    for shard in failed:
        for part in chunked([int(i) for i in shard.item_ids]):
            s.execute(
                delete(SkippedImage).where(
                    SkippedImage.retrieval_run_id == run_id,
                    SkippedImage.kind == shard.kind,
                    SkippedImage.item_id.in_(part),
                )
            )
    s.execute(
        update(EmbeddingShard)
        .where(EmbeddingShard.retrieval_run_id == run_id, EmbeddingShard.status != DONE)
        .values(status=PENDING, attempts=0, error=None, finished_at=None, leased_by=None, lease_until=None)
    )
    s.execute(
        update(RetrievalRun)
        .where(RetrievalRun.id == run_id, RetrievalRun.status == RETRIEVAL_FAILED)
        .values(status=RETRIEVAL_RUNNING, error=None, finished_at=None)
    )
    return len(failed)


def done_shards(s: Session, run_id: int, kind: str) -> list[EmbeddingShard]:
    """The run's stored shards of one kind, by index (each names its file)."""
    return list(
        s.scalars(
            select(EmbeddingShard)
            .where(
                EmbeddingShard.retrieval_run_id == run_id,
                EmbeddingShard.kind == kind,
                EmbeddingShard.status == DONE,
            )
            .order_by(EmbeddingShard.shard_index)
        )
    )


def ground_truth(s: Session, query_ids: Sequence[int]) -> list[Row]:
    """``(query_id, tile_id, relation)`` of these queries."""
    out: list[Row] = []
    for part in chunked(list(query_ids)):
        out.extend(
            s.execute(
                select(GroundTruth.query_id, GroundTruth.tile_id, GroundTruth.relation).where(
                    GroundTruth.query_id.in_(part)
                )
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# runs (orchestrator retrieve)


def dataset_items(s: Session, dataset_id: int) -> tuple[list[int], list[int]]:
    """The dataset's tile ids and query ids, in id order."""
    tiles = list(s.scalars(select(Tile.id).where(Tile.dataset_id == dataset_id).order_by(Tile.id)))
    queries = list(s.scalars(select(Query.id).where(Query.dataset_id == dataset_id).order_by(Query.id)))
    return tiles, queries


def run_by_name(s: Session, name: str) -> RetrievalRun | None:
    return s.scalar(select(RetrievalRun).where(RetrievalRun.name == name))


def add_shards(s: Session, rows: Sequence[dict[str, Any]]) -> None:
    insert_ignore(s, EmbeddingShard.__table__, rows, key=["retrieval_run_id", "kind", "shard_index"])


def count_shards(s: Session, run_id: int, status: str | None = None) -> int:
    stmt = select(func.count()).select_from(EmbeddingShard).where(EmbeddingShard.retrieval_run_id == run_id)
    if status is not None:
        stmt = stmt.where(EmbeddingShard.status == status)
    return s.scalar(stmt) or 0


def run_status(s: Session, run_id: int) -> str | None:
    return s.scalar(select(RetrievalRun.status).where(RetrievalRun.id == run_id))


def any_pending(s: Session, run_id: int) -> bool:
    stmt = select(EmbeddingShard.id).where(
        EmbeddingShard.retrieval_run_id == run_id, EmbeddingShard.status == PENDING
    )
    return s.scalar(stmt.limit(1)) is not None


def progress_counts(s: Session, run_id: int) -> tuple[dict[str, int], int, int]:
    """Shards per status, images embedded and images skipped."""
    counts = {PENDING: 0, DONE: 0, FAILED: 0}
    embedded = 0
    for status, n, emb in s.execute(
        select(EmbeddingShard.status, func.count(), func.coalesce(func.sum(EmbeddingShard.n_embedded), 0))
        .where(EmbeddingShard.retrieval_run_id == run_id)
        .group_by(EmbeddingShard.status)
    ):
        counts[status] = n
        embedded += int(emb or 0)
    skipped = s.scalar(
        select(func.count()).select_from(SkippedImage).where(SkippedImage.retrieval_run_id == run_id)
    )
    return counts, embedded, skipped or 0
