"""Datasets, their tiles, queries and labels, and imported candidate sets: the SQL that ingest and
import-candidates run (``orchestrator/ingest.py``, ``orchestrator/candidates.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Candidate, Dataset, Query, Tile
from db.upsert import insert_ignore


def ensure_dataset(s: Session, root: Path) -> int:
    """The id of the dataset at ``root`` (resolved), created if new."""
    root = root.resolve()
    insert_ignore(s, Dataset.__table__, [{"root": str(root), "name": root.name}], key=["root"])
    return s.scalar(select(Dataset.id).where(Dataset.root == str(root)))


def name_to_id(s: Session, model: type[Tile] | type[Query], dataset_id: int) -> dict[str, int]:
    """``file name -> id`` of the dataset's tiles or queries."""
    return dict(s.execute(select(model.name, model.id).where(model.dataset_id == dataset_id)).all())


def datasets(s: Session, dataset: str | None = None) -> list[Dataset]:
    """Every dataset by id, or those whose root or name is ``dataset``."""
    stmt = select(Dataset).order_by(Dataset.id)
    if dataset:
        root = str(Path(dataset).expanduser().resolve())
        stmt = stmt.where((Dataset.root == root) | (Dataset.name == dataset))
    return list(s.scalars(stmt))


def datasets_holding(s: Session, query_names: Sequence[str]) -> list[tuple[int, int]]:
    """``(dataset id, how many of the names)`` for each dataset holding any of these queries."""
    stmt = (
        select(Query.dataset_id, func.count())
        .where(Query.name.in_(list(query_names)))
        .group_by(Query.dataset_id)
    )
    return [(d, n) for d, n in s.execute(stmt)]


def candidate_triples(s: Session, candidate_set_id: int) -> set[tuple[int, int, int]]:
    """``(query id, rank, tile id)`` of every candidate the set stores."""
    stmt = select(Candidate.query_id, Candidate.rank, Candidate.tile_id).where(
        Candidate.candidate_set_id == candidate_set_id
    )
    return {(q, r, t) for q, r, t in s.execute(stmt)}
