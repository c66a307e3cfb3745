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


def dataset_ids_named(s: Session, root_or_name: str) -> list[int]:
    """Datasets whose root (resolved) or name is ``root_or_name``."""
    root = str(Path(root_or_name).resolve())
    return list(s.scalars(select(Dataset.id).where((Dataset.root == root) | (Dataset.name == root_or_name))))


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
