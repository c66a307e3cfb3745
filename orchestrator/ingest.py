"""Write VIGOR records into the database, idempotently: a second ingest changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from db.datasets import ensure_dataset, name_to_id
from db.models import GroundTruth, Query, Tile
from db.queries import chunked
from db.upsert import insert_ignore
from orchestrator.vigor import VigorData, read_vigor


@dataclass(frozen=True)
class IngestSummary:
    dataset_id: int
    tiles: int
    queries: int
    labels: int
    new_tiles: int
    new_queries: int
    new_labels: int
    missing_images: int


def ingest_directory(
    s: Session, root: str | Path, split: str = "cross-area", cities: list[str] | None = None
) -> IngestSummary:
    """Read the VIGOR dataset at ``root`` (``split``, ``cities``: default its test cities) and store it."""
    return ingest(s, root, read_vigor(root, split, cities))


def ingest(s: Session, root: str | Path, data: VigorData) -> IngestSummary:
    """Store tiles, queries and ground truth of ``data`` under the dataset at ``root``."""
    dataset_id = ensure_dataset(s, Path(root))
    tile_rows = [
        {"dataset_id": dataset_id, "city": t.city, "name": t.name, "path": t.path, "lat": t.lat, "lon": t.lon}
        for t in data.tiles
    ]
    query_rows = [
        {
            "dataset_id": dataset_id,
            "city": q.city,
            "name": q.name,
            "panoid": q.panoid,
            "path": q.path,
            "lat": q.lat,
            "lon": q.lon,
        }
        for q in data.queries
    ]
    new_tiles = insert_ignore(s, Tile.__table__, tile_rows, key=["dataset_id", "name"], returning=["id"])
    new_queries = insert_ignore(s, Query.__table__, query_rows, key=["dataset_id", "name"], returning=["id"])
    tiles = name_to_id(s, Tile, dataset_id)
    queries = name_to_id(s, Query, dataset_id)
    label_rows = [
        {
            "query_id": queries[lb.query],
            "tile_id": tiles[lb.tile],
            "relation": lb.relation,
            "dy": lb.dy,
            "dx": lb.dx,
        }
        for lb in data.labels
    ]
    new_labels = 0
    for part in chunked(label_rows, 5000):
        new_labels += len(
            insert_ignore(s, GroundTruth.__table__, part, key=["query_id", "tile_id"], returning=["query_id"])
        )
    return IngestSummary(
        dataset_id=dataset_id,
        tiles=len(tile_rows),
        queries=len(query_rows),
        labels=len(label_rows),
        new_tiles=len(new_tiles),
        new_queries=len(new_queries),
        new_labels=new_labels,
        missing_images=len(data.missing_images),
    )
