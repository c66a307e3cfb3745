"""A run with at most N queries open: never more than N have judgments in flight, queries are let in
in id order as others finish, resume keeps the bound, and the rankings are those of a run with
every query open at once. Queries are routed to their per-GPU queue, always the same one."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from sqlalchemy import select

import orchestrator.coordinator as coordinator
from db.engine import session_factory
from db.models import Candidate, PairwiseVerdict, Ranking, Run, RunQuery
from db.queries import record_outcomes, run_info
from orchestrator.cli import cli
from orchestrator.reconcile import reconcile
from orchestrator.submit import OPEN_QUERIES_PER_GPU, RunSpec, create_run
from workers import dispatch
from workers.queues import JUDGE_PAIRWISE_TASK, shard_of, shard_queue


@pytest.fixture
def stored(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.chdir(tmp_path)
    for args in (
        ("synth", "data", "--queries", "14", "--k", "8"),
        ("ingest", "data"),
        ("import-candidates", "data/candidates.csv", "--name", "c"),
    ):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return session_factory()


def oracle(a: int, b: int) -> bool:
    return random.Random(a * 7919 + b).random() < 0.55


def open_and_started(sf, run_id: int) -> tuple[list[int], list[int]]:
    """(queries with a judgment and no ranking yet, every query with a judgment), by id."""
    with sf() as s:
        started = set(s.scalars(select(PairwiseVerdict.query_id).where(PairwiseVerdict.run_id == run_id)))
        done = set(
            s.scalars(
                select(RunQuery.query_id).where(RunQuery.run_id == run_id, RunQuery.done_at.is_not(None))
            )
        )
    return sorted(started - done), sorted(started)


def drive(sf, spec: RunSpec, seed: int, check) -> int:
    """Judge pending rows in random batches with the oracle until the run is done."""
    rng = random.Random(seed)
    with sf.begin() as s:
        run_id = create_run(s, spec)
    coordinator.advance(run_id, sessions=sf)
    for step in range(10_000):
        check(run_id)
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
        batch = rng.sample(pending, k=max(1, len(pending) // 2))
        with sf.begin() as s:
            record_outcomes(
                s,
                "pairwise",
                [{"id": i, "status": "done", "first_wins": oracle(a, b)} for i, _, a, b in batch],
                "t",
                "t",
            )
        if step % 7 == 3:
            reconcile(run_id, sf)  # resume: re-sends stale judgments and replays every open query
        else:
            coordinator.advance(run_id, sorted({q for _, q, _, _ in batch}), sessions=sf)
    raise AssertionError("the run did not finish")


def rankings(sf, run_id: int) -> dict:
    with sf() as s:
        return {
            (q, r): t
            for q, r, t in s.execute(
                select(Ranking.query_id, Ranking.rank, Ranking.tile_id).where(Ranking.run_id == run_id)
            )
        }


def test_at_most_n_queries_are_open_and_they_are_let_in_in_order(stored):
    with stored() as s:
        all_ids = sorted(s.scalars(select(Candidate.query_id).where(Candidate.rank == 1)))
    peak = []

    def check(run_id: int) -> None:
        open_now, started = open_and_started(stored, run_id)
        assert len(open_now) <= 3
        assert started == all_ids[: len(started)]  # let in by query id
        peak.append(len(open_now))

    windowed = drive(
        stored, RunSpec(strategy="pairwise", k=8, n_queries=None, reuse=False, max_open_queries=3), 1, check
    )
    assert max(peak) == 3
    everyone = drive(
        stored, RunSpec(strategy="pairwise", k=8, n_queries=None, reuse=False), 2, lambda run_id: None
    )
    assert len(rankings(stored, windowed)) == 14 * 8
    assert rankings(stored, windowed) == rankings(stored, everyone)


def test_vlm_runs_open_64_queries_per_gpu_queue_and_the_simulated_judge_all(stored, monkeypatch):
    with stored.begin() as s:
        sim = run_info(s, create_run(s, RunSpec(n_queries=None, k=8)))
        llava = run_info(s, create_run(s, RunSpec(judge="llava", n_queries=None, k=8)))
        monkeypatch.setenv("CVGL_VLM_SHARDS", "3")
        qwen = run_info(s, create_run(s, RunSpec(judge="qwen2.5-vl", n_queries=None, k=8)))
        every = run_info(
            s, create_run(s, RunSpec(judge="qwen2.5-vl", n_queries=None, k=8, max_open_queries=0))
        )
    assert coordinator.open_window(sim) is None and coordinator.open_window(every) is None
    assert coordinator.open_window(llava) == OPEN_QUERIES_PER_GPU
    assert coordinator.open_window(qwen) == 3 * OPEN_QUERIES_PER_GPU and qwen.params["shards"] == 3


def test_each_query_goes_to_its_own_gpu_queue(stored, monkeypatch):
    sent: list[tuple[str, list[int]]] = []
    limits: list[float] = []

    def send_task(name, args, queue, time_limit, task_id, countdown=None):
        assert name == JUDGE_PAIRWISE_TASK
        sent.append((queue, args[0]))
        limits.append(time_limit)

    monkeypatch.setattr(dispatch.app, "send_task", send_task)
    monkeypatch.setenv("CVGL_VLM_SHARDS", "3")
    with stored.begin() as s:
        run_id = create_run(s, RunSpec(judge="simulated", n_queries=None, k=8, batch_size=5))
    coordinator.advance(run_id, sessions=stored)
    with stored() as s:
        query_of = dict(s.execute(select(PairwiseVerdict.id, PairwiseVerdict.query_id)).all())
        base = s.get(Run, run_id).queue
    assert {q for q, _ in sent} == {f"{base}.{i}" for i in range(3)}
    for queue, ids in sent:
        assert len(ids) <= 5
        assert {shard_queue(base, shard_of(query_of[i], 3), 3) for i in ids} == {queue}
    # A query's comparisons travel side by side: at most cut once, by a task boundary.
    tasks_of_query: dict[int, set[int]] = {}
    for n, (_, ids) in enumerate(sent):
        for i in ids:
            tasks_of_query.setdefault(query_of[i], set()).add(n)
    assert all(len(t) <= 2 and max(t) - min(t) == len(t) - 1 for t in tasks_of_query.values())
    # A task's hard time limit grows with its size (a hung GPU stops it; workers/dispatch.py).
    assert all(limit == dispatch.time_limit(len(ids)) for limit, (_, ids) in zip(limits, sent, strict=True))
    assert dispatch.time_limit(5) > dispatch.time_limit(1)
