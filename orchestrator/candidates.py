"""Import a stage-1 retrieval run: precomputed top-K candidates per query from a CSV file.

The file has a header ``query,tile,rank,score`` (score optional): ``query`` is the panorama file
name, ``tile`` the satellite file name, ``rank`` 1-based. Every query must have ranks 1..K with
the same K and distinct tiles; unknown names are refused before anything is stored.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from db.datasets import candidate_triples, datasets, datasets_holding, name_to_id
from db.models import Candidate, CandidateSet, Query, Tile
from db.queries import candidate_set_named
from db.upsert import insert_ignore


class CandidateFileError(ValueError):
    pass


@dataclass(frozen=True)
class ImportSummary:
    candidate_set_id: int
    name: str
    queries: int
    k: int
    created: bool


def read_candidates_csv(path: str | Path) -> dict[str, list[tuple[int, str, float | None]]]:
    """query name -> [(rank, tile name, score)], validated for shape (not for names)."""
    path = Path(path)
    if not path.is_file():
        raise CandidateFileError(f"candidates file {path} does not exist")
    per_query: dict[str, list[tuple[int, str, float | None]]] = defaultdict(list)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"query", "tile", "rank"} - set(reader.fieldnames or ())
        if missing:
            raise CandidateFileError(
                f"{path}: header must have query,tile,rank[,score]; missing {sorted(missing)}"
            )
        for lineno, row in enumerate(reader, start=2):
            try:
                rank = int(row["rank"])
                score = float(row["score"]) if row.get("score") not in (None, "") else None
            except ValueError as exc:
                raise CandidateFileError(f"{path}:{lineno}: bad rank or score ({exc})") from exc
            if not row["query"] or not row["tile"]:
                raise CandidateFileError(f"{path}:{lineno}: empty query or tile")
            per_query[row["query"]].append((rank, row["tile"], score))
    if not per_query:
        raise CandidateFileError(f"{path}: no candidates")
    ks = set()
    for q, rows in per_query.items():
        rows.sort()
        if [r for r, _, _ in rows] != list(range(1, len(rows) + 1)):
            raise CandidateFileError(f"{path}: ranks of query {q!r} are not 1..{len(rows)}")
        if len({t for _, t, _ in rows}) != len(rows):
            raise CandidateFileError(f"{path}: query {q!r} lists a tile twice")
        ks.add(len(rows))
    if len(ks) != 1:
        raise CandidateFileError(
            f"{path}: every query needs the same number of candidates, found {sorted(ks)}"
        )
    return dict(per_query)


def resolve_dataset(s: Session, dataset: str | None, query_names: list[str]) -> int:
    """The dataset given (root path or name), or the one whose queries these names are."""
    if dataset:
        ids = [d.id for d in datasets(s, dataset)]
        if len(ids) != 1:
            raise CandidateFileError(f"dataset {dataset!r} is {'ambiguous' if ids else 'not ingested'}")
        return ids[0]
    sample = query_names[:50]
    hits = datasets_holding(s, sample)
    if not hits:
        raise CandidateFileError("none of the file's queries is ingested; run `orchestrator ingest` first")
    if len(hits) > 1:
        raise CandidateFileError("the file's queries exist in several datasets; pass --dataset")
    return hits[0][0]


def import_candidates(s: Session, path: str | Path, name: str, dataset: str | None = None) -> ImportSummary:
    per_query = read_candidates_csv(path)
    dataset_id = resolve_dataset(s, dataset, sorted(per_query))
    queries = name_to_id(s, Query, dataset_id)
    tiles = name_to_id(s, Tile, dataset_id)
    unknown_q = sorted(q for q in per_query if q not in queries)
    unknown_t = sorted({t for rows in per_query.values() for _, t, _ in rows if t not in tiles})
    if unknown_q or unknown_t:
        parts = []
        if unknown_q:
            parts.append(f"{len(unknown_q)} unknown queries (e.g. {unknown_q[:3]})")
        if unknown_t:
            parts.append(f"{len(unknown_t)} unknown tiles (e.g. {unknown_t[:3]})")
        raise CandidateFileError(f"{path}: " + " and ".join(parts) + " in this dataset")
    k = len(next(iter(per_query.values())))
    rows = [
        {"query_id": queries[q], "rank": r, "tile_id": tiles[t], "score": sc}
        for q, lst in per_query.items()
        for r, t, sc in lst
    ]
    existing = candidate_set_named(s, name)
    if existing is not None:
        stored = candidate_triples(s, existing.id)
        if stored != {(x["query_id"], x["rank"], x["tile_id"]) for x in rows}:
            raise CandidateFileError(
                f"candidate set {name!r} already exists with other candidates; choose another --name"
            )
        return ImportSummary(existing.id, name, len(per_query), existing.k, created=False)
    cs = CandidateSet(
        name=name, dataset_id=dataset_id, k=k, source="import", details={"file": str(Path(path).resolve())}
    )
    s.add(cs)
    s.flush()
    insert_ignore(
        s,
        Candidate.__table__,
        [{**x, "candidate_set_id": cs.id} for x in rows],
        key=["candidate_set_id", "query_id", "rank"],
    )
    return ImportSummary(cs.id, name, len(per_query), k, created=True)
