"""The coordinator's per-process judgment cache against several coordinator processes.

Two caches stand in for two coordinator processes: verdicts complete in random order, and each
advance goes to a random one of them (as Celery would hand ``cvgl.advance`` messages to any
process), sometimes with every open query (as ``resume`` does). A cache then misses rows the other
inserted and believes rows pending that the other saw finish. The run must still end, with the
very rankings and judgments of a run advanced by one process, and the test checks that the
conflict path (reload and replay again) really ran.
"""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import orchestrator.coordinator as coordinator
from db.engine import session_factory
from db.models import PairwiseVerdict, Ranking, Run
from db.queries import record_outcomes
from orchestrator.cli import cli
from orchestrator.replay_cache import JudgmentCache
from orchestrator.submit import RunSpec, create_run


@pytest.fixture
def stored(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.chdir(tmp_path)
    for args in (
        ("synth", "data", "--queries", "12", "--k", "10"),
        ("ingest", "data"),
        ("import-candidates", "data/candidates.csv", "--name", "c"),
    ):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return session_factory()


def oracle(a: int, b: int) -> bool:
    """A fixed, non-transitive answer: does the first shown tile win?"""
    return random.Random(a * 7919 + b).random() < 0.6


def drive(sf, caches: list[JudgmentCache], seed: int, monkeypatch) -> int:
    """Run a pairwise run to the end; each advance goes to a random cache. Returns the run id."""
    rng = random.Random(seed)
    with sf.begin() as s:
        run_id = create_run(s, RunSpec(strategy="pairwise", k=10, n_queries=None, seed=0, reuse=False))

    def advance(query_ids=None):
        monkeypatch.setattr(coordinator, "JUDGMENTS", rng.choice(caches))
        return coordinator.advance(run_id, query_ids, sessions=sf)

    advance()
    for _ in range(10_000):
        with sf() as s:
            if s.get(Run, run_id).status == "done":
                return run_id
            pending = s.execute(
                select(
                    PairwiseVerdict.id,
                    PairwiseVerdict.query_id,
                    PairwiseVerdict.tile_first,
                    PairwiseVerdict.tile_second,
                ).where(PairwiseVerdict.run_id == run_id, PairwiseVerdict.status == "pending")
            ).all()
        batch = rng.sample(pending, k=max(1, len(pending) // 3))
        with sf.begin() as s:
            record_outcomes(
                s,
                "pairwise",
                [{"id": i, "status": "done", "first_wins": oracle(a, b)} for i, _, a, b in batch],
                worker="test",
                model_revision="test",
            )
        advance(None if rng.random() < 0.1 else sorted({q for _, q, _, _ in batch}))
    raise AssertionError("the run did not finish")


def outcome(sf, run_id: int) -> tuple[dict, list]:
    with sf() as s:
        rankings = s.execute(
            select(Ranking.query_id, Ranking.rank, Ranking.tile_id).where(Ranking.run_id == run_id)
        ).all()
        verdicts = s.execute(
            select(PairwiseVerdict.query_id, PairwiseVerdict.tile_first, PairwiseVerdict.tile_second)
            .where(PairwiseVerdict.run_id == run_id)
            .order_by(PairwiseVerdict.query_id, PairwiseVerdict.tile_first, PairwiseVerdict.tile_second)
        ).all()
    return {(q, r): t for q, r, t in rankings}, verdicts


def test_two_caches_decide_what_one_process_decides(stored, monkeypatch):
    one = drive(stored, [JudgmentCache()], seed=1, monkeypatch=monkeypatch)

    conflicted = []
    real_replay_queries = coordinator._replay_queries

    def spy(*args, **kwargs):
        out = real_replay_queries(*args, **kwargs)
        conflicted.extend(out.conflicted)
        return out

    monkeypatch.setattr(coordinator, "_replay_queries", spy)
    two = drive(stored, [JudgmentCache(), JudgmentCache()], seed=2, monkeypatch=monkeypatch)

    rankings_one, verdicts_one = outcome(stored, one)
    rankings_two, verdicts_two = outcome(stored, two)
    assert len(rankings_one) == 12 * 10
    assert rankings_two == rankings_one
    assert verdicts_two == verdicts_one  # the same comparisons, none twice (the key is unique)
    # The path under test ran: replays asked for rows their cache did not know, and replayed again.
    assert conflicted
    with stored() as s:
        left = s.scalar(
            select(func.count()).select_from(PairwiseVerdict).where(PairwiseVerdict.status == "pending")
        )
    assert left == 0


def test_a_cache_bounded_below_the_open_queries_still_finishes(stored, monkeypatch):
    one = drive(stored, [JudgmentCache()], seed=3, monkeypatch=monkeypatch)
    tiny = drive(stored, [JudgmentCache(max_queries=2)], seed=4, monkeypatch=monkeypatch)
    assert outcome(stored, tiny) == outcome(stored, one)
