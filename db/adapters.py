"""The SQL of fine-tuning: adapters, the labels they train on, their steps and checkpoints.

An adapter row is a work item (``db/work_items.py``, ``db/leases.py``): the trainer process that
holds its lease is the only writer of its steps, checkpoints and outcome. Imports only ``db``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import (
    DONE,
    FAILED,
    PENDING,
    Adapter,
    AdapterCheckpoint,
    AdapterQuery,
    Candidate,
    CandidateSet,
    Dataset,
    GroundTruth,
    Query,
    Tile,
    TrainingStep,
)
from db.queries import chunked, now

ADAPTERS = Adapter.__table__
STEP_FIGURES = ("loss", "lr", "val_accuracy", "val_loss", "seconds")


@dataclass(frozen=True)
class Labeled:
    """A query with its labels and stage-1 candidates (tile ids in rank order)."""

    query_id: int
    name: str
    positive: int
    semi_positives: frozenset[int]
    candidates: tuple[int, ...]


def adapter_named(s: Session, name: str) -> Adapter | None:
    return s.scalars(select(Adapter).where(Adapter.name == name)).first()


def adapters(s: Session) -> list[Adapter]:
    return list(s.scalars(select(Adapter).order_by(Adapter.id)))


def labeled_queries(
    s: Session, candidate_set_id: int, query_ids: Iterable[int] | None = None
) -> list[Labeled]:
    """The candidate set's queries that have a positive tile, with semi-positives and candidates."""
    cands: dict[int, list[int]] = {}
    stmt = (
        select(Candidate.query_id, Candidate.tile_id)
        .where(Candidate.candidate_set_id == candidate_set_id)
        .order_by(Candidate.query_id, Candidate.rank)
    )
    wanted = set(query_ids) if query_ids is not None else None
    for q, t in s.execute(stmt):
        if wanted is None or q in wanted:
            cands.setdefault(q, []).append(t)
    positives: dict[int, int] = {}
    semis: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for part in chunked(sorted(cands)):
        ids = list(part)
        gt = select(GroundTruth.query_id, GroundTruth.tile_id, GroundTruth.relation).where(
            GroundTruth.query_id.in_(ids)
        )
        for q, t, relation in s.execute(gt):
            if relation == "positive":
                positives[q] = t
            else:
                semis.setdefault(q, set()).add(t)
        names.update({q: n for q, n in s.execute(select(Query.id, Query.name).where(Query.id.in_(ids)))})
    return [
        Labeled(q, names[q], positives[q], frozenset(semis.get(q, ())), tuple(cands[q]))
        for q in sorted(cands)
        if q in positives
    ]


@dataclass(frozen=True)
class TrainingInputs:
    """Paths a trainer needs: the dataset root and every query's and tile's relative path."""

    root: str
    query_paths: dict[int, str]
    tile_paths: dict[int, str]


def training_inputs(s: Session, adapter: Adapter, labels: Sequence[Labeled]) -> TrainingInputs:
    root = s.execute(
        select(Dataset.root)
        .join(CandidateSet, CandidateSet.dataset_id == Dataset.id)
        .where(CandidateSet.id == adapter.candidate_set_id)
    ).scalar_one()
    qids = [x.query_id for x in labels]
    tids = sorted({t for x in labels for t in (x.positive, *x.candidates)})
    queries: dict[int, str] = {}
    tiles: dict[int, str] = {}
    for part in chunked(qids):
        queries.update(
            {q: p for q, p in s.execute(select(Query.id, Query.path).where(Query.id.in_(list(part))))}
        )
    for part in chunked(tids):
        tiles.update({t: p for t, p in s.execute(select(Tile.id, Tile.path).where(Tile.id.in_(list(part))))})
    return TrainingInputs(root, queries, tiles)


def adapter_query_ids(s: Session, adapter_id: int, role: str | None = None) -> list[int]:
    stmt = select(AdapterQuery.query_id).where(AdapterQuery.adapter_id == adapter_id)
    if role is not None:
        stmt = stmt.where(AdapterQuery.role == role)
    return list(s.scalars(stmt.order_by(AdapterQuery.query_id)))


def overlapping_queries(s: Session, adapter_id: int, query_ids: Sequence[int]) -> list[str]:
    """Names of ``query_ids`` the adapter saw in training or validation: the same panorama (city
    and file name), in whichever dataset it was ingested."""
    seen = {
        (city, name)
        for city, name in s.execute(
            select(Query.city, Query.name)
            .join(AdapterQuery, AdapterQuery.query_id == Query.id)
            .where(AdapterQuery.adapter_id == adapter_id)
        )
    }
    out = []
    for part in chunked(list(query_ids)):
        for city, name in s.execute(select(Query.city, Query.name).where(Query.id.in_(list(part)))):
            if (city, name) in seen:
                out.append(name)
    return sorted(out)


# -- the trainer's writes (guarded by its lease) --------------------------------------------------


def record_step(s: Session, adapter_id: int, step: int, **figures: Any) -> None:
    """Store a step's figures; a step seen again (a resumed job redoes the steps after its last
    checkpoint) keeps one row, with the newest values."""
    values = {k: v for k, v in figures.items() if k in STEP_FIGURES and v is not None}
    row = s.get(TrainingStep, (adapter_id, step))
    if row is None:
        s.add(TrainingStep(adapter_id=adapter_id, step=step, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)


def record_checkpoint(s: Session, adapter_id: int, step: int, path: str) -> None:
    row = s.get(AdapterCheckpoint, (adapter_id, step))
    if row is None:
        s.add(AdapterCheckpoint(adapter_id=adapter_id, step=step, path=path))
    else:
        row.path = path


def latest_checkpoint(s: Session, adapter_id: int) -> tuple[int, str] | None:
    row = s.execute(
        select(AdapterCheckpoint.step, AdapterCheckpoint.path)
        .where(AdapterCheckpoint.adapter_id == adapter_id)
        .order_by(AdapterCheckpoint.step.desc())
        .limit(1)
    ).first()
    return (row.step, row.path) if row else None


def forget_checkpoints(s: Session, adapter_id: int, steps: Sequence[int]) -> None:
    s.execute(
        delete(AdapterCheckpoint).where(
            AdapterCheckpoint.adapter_id == adapter_id, AdapterCheckpoint.step.in_(list(steps))
        )
    )


def finish_adapter(s: Session, adapter_id: int, me: str, sha256: str, base_revision: str) -> bool:
    """Mark the adapter done, if this process still holds it; False when it does not."""
    stmt = (
        update(ADAPTERS)
        .where(ADAPTERS.c.id == adapter_id, ADAPTERS.c.status == PENDING, ADAPTERS.c.leased_by == me)
        .values(
            status=DONE,
            adapter_sha256=sha256,
            base_revision=base_revision,
            finished_at=now(),
            leased_by=None,
            lease_until=None,
            error=None,
        )
    )
    return bool(s.execute(stmt).rowcount)


def fail_adapter(s: Session, adapter_id: int, me: str, error: str) -> bool:
    stmt = (
        update(ADAPTERS)
        .where(ADAPTERS.c.id == adapter_id, ADAPTERS.c.status == PENDING, ADAPTERS.c.leased_by == me)
        .values(status=FAILED, error=error[:2000], finished_at=now(), leased_by=None, lease_until=None)
    )
    return bool(s.execute(stmt).rowcount)


def training_steps(s: Session, adapter_id: int) -> list[TrainingStep]:
    return list(
        s.scalars(
            select(TrainingStep).where(TrainingStep.adapter_id == adapter_id).order_by(TrainingStep.step)
        )
    )
