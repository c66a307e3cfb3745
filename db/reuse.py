"""Judgment reuse: a verdict or score another run already stored for the very same judgment.

Two judgments are the same when their runs match on judge, model, model revision (as the runs
name it: pin ``--revision`` to a commit so a moving branch cannot match across model updates),
prompt sha256, judge options and decode mode, and the rows match on query, tiles and the order
shown. The coordinator copies such a row into the new run as 'done', with ``reused_from_id``
pointing at the judgment that was really computed, instead of asking a worker again. Judges
that answer from request context beyond the images (the simulated judge reads stage-1 ranks)
reuse only within the same candidate set. Imports only ``db`` modules.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import DONE, Run
from db.queries import (
    JUDGMENT_MODELS,
    KEY_COLUMNS,
    RESULT_COLUMNS,
    RunInfo,
    id_parts,
    is_postgres,
    member_of,
    now,
)
from db.upsert import insert_ignore

# Judges whose answer depends on the candidate set (stage-1 ranks), not only on the images.
CONTEXT_JUDGES = frozenset({"simulated"})


def reuse_enabled(info: RunInfo) -> bool:
    """Runs reuse unless submitted with ``--no-reuse`` (params ``reuse: false``)."""
    return bool(info.params.get("reuse", True))


def _canonical(options: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(options or {}), sort_keys=True, default=str)


def reuse_sources(session: Session, info: RunInfo) -> list[int]:
    """Other runs whose stored judgments are the same judgments as this run's."""
    stmt = select(Run.id, Run.params).where(
        Run.id != info.id,
        Run.judge == info.judge,
        Run.model == info.model,
        Run.model_revision == info.model_revision,
        Run.prompt_sha256 == info.prompt_sha256,
    )
    if info.judge in CONTEXT_JUDGES:
        stmt = stmt.where(Run.candidate_set_id == info.candidate_set_id)
    wanted = (_canonical(info.params.get("judge_options")), info.params.get("decode", "choices"))
    return sorted(
        run_id
        for run_id, params in session.execute(stmt)
        # --decode generate reads a different answer than the forward pass: not the same judgment.
        if (_canonical((params or {}).get("judge_options")), (params or {}).get("decode", "choices"))
        == wanted
    )


def reusable(
    session: Session, kind: str, source_runs: Sequence[int], query_ids: Sequence[int]
) -> dict[int, dict[Any, dict[str, Any]]]:
    """Done judgments of ``source_runs`` for these queries: query -> key -> the row to copy.

    The key is (tile_first, tile_second) or the tile id, as the coordinator names needs. Of
    several copies of one judgment the oldest wins, so the choice is the same on every replay.
    """
    out: dict[int, dict[Any, dict[str, Any]]] = defaultdict(dict)
    if not source_runs or not query_ids:
        return out
    model = JUDGMENT_MODELS[kind]
    keys = KEY_COLUMNS[kind]
    cols = [
        model.id,
        model.reused_from_id,
        model.query_id,
        *(model.__table__.c[k] for k in keys),
        *(model.__table__.c[c] for c in RESULT_COLUMNS[kind]),
        model.raw_output,
        model.worker,
        model.model_revision,
    ]
    pg = is_postgres(session)
    t = model.__table__
    stmt = (
        select(*cols)
        .where(member_of(t.c.run_id, "runs", pg), member_of(t.c.query_id, "ids", pg), model.status == DONE)
        .order_by(model.id)
    )
    for runs in id_parts(source_runs, pg):
        for part in id_parts(query_ids, pg):
            for r in session.execute(stmt, {"runs": runs, "ids": part}):
                m = r._mapping
                key = tuple(m[k] for k in keys) if len(keys) > 1 else m[keys[0]]
                found = out[m["query_id"]].get(key)
                if found is None or m["id"] < found["id"]:
                    out[m["query_id"]][key] = dict(m)
    return out


def copy_row(kind: str, run_id: int, source: Mapping[str, Any]) -> dict[str, Any]:
    """The new run's row for a reused judgment: done, the source's outcome and provenance."""
    row = {
        "run_id": run_id,
        "query_id": source["query_id"],
        **{k: source[k] for k in KEY_COLUMNS[kind]},
        **{c: source[c] for c in RESULT_COLUMNS[kind]},
        "status": DONE,
        "raw_output": source["raw_output"],
        "worker": source["worker"],
        "model_revision": source["model_revision"],
        "attempts": 0,
        "latency_ms": None,  # no time spent on it in this run
        "finished_at": now(),
        # Point at the judgment that was computed, not at another copy of it.
        "reused_from_id": source["reused_from_id"] or source["id"],
    }
    return row


def insert_reused(session: Session, kind: str, rows: Sequence[Mapping[str, Any]]) -> tuple[int, set[int]]:
    """Store reused rows. Returns how many were stored, and the queries where some row was not
    (its key existed already)."""
    if not rows:
        return 0, set()
    model = JUDGMENT_MODELS[kind]
    key = ["run_id", "query_id", *KEY_COLUMNS[kind]]
    stored = insert_ignore(session, model.__table__, rows, key=key, returning=["id", "query_id"])
    per_query: dict[int, int] = defaultdict(int)
    for _, q in stored:
        per_query[q] += 1
    asked: dict[int, int] = defaultdict(int)
    for r in rows:
        asked[r["query_id"]] += 1
    return len(stored), {q for q, n in asked.items() if per_query[q] < n}
