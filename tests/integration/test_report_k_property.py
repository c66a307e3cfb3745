"""Property: for every K in 1..20 and random candidate sets, a run's row and its baseline row in the
report equal the SQL view ``run_recall`` and a count written here from the generated data, on
SQLite and PostgreSQL. Rows are stored directly (no workers): this is about the arithmetic."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from db.migrate import upgrade_to_head
from db.models import Candidate, CandidateSet, Dataset, GroundTruth, Query, Ranking, Run, RunQuery, Tile
from orchestrator.reporting.build import build_report

pytestmark = pytest.mark.integration

KS = (1, 3, 5, 10)
N_QUERIES = 30
POOL = 25  # candidate tiles per query


def _store(s: Session, rng: random.Random) -> dict[int, dict]:
    """A dataset, two candidate sets (K=20 and K=12) with positives at random ranks or missing, and
    one run per K in 1..20 with random rankings of its top K and a random share of queries done."""
    ds = Dataset(root=f"/data/{rng.random()}", name="prop")
    s.add(ds)
    s.flush()
    queries, tiles = [], {}
    for i in range(N_QUERIES):
        q = Query(
            dataset_id=ds.id, city="X", name=f"q{i}.jpg", panoid=f"p{i}", path=f"q{i}.jpg", lat=0, lon=0
        )
        s.add(q)
        queries.append(q)
        tiles[i] = [
            Tile(dataset_id=ds.id, city="X", name=f"t{i}-{j}.png", path=f"t{i}-{j}.png", lat=0, lon=0)
            for j in range(POOL)
        ]
        s.add_all(tiles[i])
    s.flush()
    for i, q in enumerate(queries):  # tile 0 of each query is its positive
        s.add(GroundTruth(query_id=q.id, tile_id=tiles[i][0].id, relation="positive", dy=0, dx=0))
    expected: dict[int, dict] = {}
    for set_k in (20, 12):
        cs = CandidateSet(name=f"cs{set_k}", dataset_id=ds.id, k=set_k, source="import", details={})
        s.add(cs)
        s.flush()
        stage1 = {}
        for i, q in enumerate(queries):
            order = rng.sample(tiles[i], set_k) if rng.random() < 0.8 else rng.sample(tiles[i][1:], set_k)
            stage1[q.id] = order
            s.add_all(Candidate(candidate_set_id=cs.id, query_id=q.id, rank=r, tile_id=t.id, score=None)
                      for r, t in enumerate(order, start=1))  # fmt: skip
        s.flush()
        for k in range(1, set_k + 1):
            run = Run(candidate_set_id=cs.id, strategy="pairwise", prompt_name="pairwise", prompt_sha256="0" * 64,
                      judge="simulated", model="simulated", model_revision="simulated-v1", queue="vlm.simulated",
                      seed=0, k=k, n_queries=N_QUERIES, batch_size=64, max_attempts=3, params={}, status="done")  # fmt: skip
            s.add(run)
            s.flush()
            done = {q.id for q in queries if rng.random() < 0.7} or {queries[0].id}
            final, base = {}, {}
            for q in queries:
                finished = q.id in done
                s.add(RunQuery(run_id=run.id, query_id=q.id, done_at=datetime.now(UTC) if finished else None))
                top = stage1[q.id][:k]
                reranked = rng.sample(top, len(top))
                if finished:
                    s.flush()
                    s.add_all(Ranking(run_id=run.id, query_id=q.id, rank=r, tile_id=t.id)
                              for r, t in enumerate(reranked, start=1))  # fmt: skip
                    positive = tiles[queries.index(q)][0].id
                    final[q.id] = next((r for r, t in enumerate(reranked, 1) if t.id == positive), None)
                    base[q.id] = next((r for r, t in enumerate(top, 1) if t.id == positive), None)
            expected[run.id] = {"k": k, "final": final, "base": base}
    s.flush()
    return expected


def _share(ranks: dict[int, int | None], k: int) -> float:
    return 100.0 * sum(1 for r in ranks.values() if r is not None and r <= k) / len(ranks)


def _check(url: str, seed: int) -> None:
    engine = create_engine(url)
    with Session(engine) as s:
        expected = _store(s, random.Random(seed))
        s.commit()
        report = build_report(s)
        view = {r.run_id: r._mapping for r in s.execute(text("SELECT * FROM run_recall"))}
    engine.dispose()
    assert {r.run_id for r in report.runs} == set(expected) == set(view)
    for row in report.runs:
        e = expected[row.run_id]
        base = report.baseline_for(row)
        assert row.k == base.k == e["k"] and row.n_queries == base.n_queries == len(e["final"])
        for k in KS:
            assert row.recall_at(k).value == pytest.approx(_share(e["final"], k), abs=1e-9)
            assert base.recall_at(k).value == pytest.approx(_share(e["base"], k), abs=1e-9), (row.run_id, k)
            assert view[row.run_id][f"recall_at_{k}"] == pytest.approx(row.recall_at(k).value, abs=1e-9)
            assert view[row.run_id][f"baseline_recall_at_{k}"] == pytest.approx(
                base.recall_at(k).value, abs=1e-9
            )
        # Every comparison against the baseline is on the run's own queries.
        vs = [c for c in report.comparisons if c.run_id == row.run_id and c.against == "baseline"]
        assert [c.n for c in vs] == [row.n_queries] * len(KS)
        for c in vs:
            assert c.delta == pytest.approx(row.recall_at(c.k).value - base.recall_at(c.k).value, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baseline_is_cut_at_each_runs_k_on_sqlite(tmp_path, seed):
    url = f"sqlite:///{tmp_path / 'prop.sqlite3'}"
    upgrade_to_head(url)
    _check(url, seed)


def test_baseline_is_cut_at_each_runs_k_on_postgresql(pg_url):
    _check(pg_url, 3)
