"""At-least-once without harm, on real PostgreSQL, Redis and Celery workers: duplicate deliveries of
a judgment being judged cost no attempt, a frozen worker's work finishes elsewhere and its late
results change nothing, and no database session holds locks for long."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from db.engine import make_engine
from db.models import PairwiseVerdict, Ranking, Run
from tests.integration.conftest import cli, wait_for
from workers.app import app

pytestmark = pytest.mark.integration

SUBMIT = ["submit", "--strategy", "pairwise", "--accuracy", "0.7", "--seed", "3", "--no-reuse"]


def _run_id(proc) -> int:
    return int(proc.stdout.strip().splitlines()[-1])


def _done(engine, run_id: int) -> bool:
    with engine.connect() as c:
        return c.scalar(select(Run.status).where(Run.id == run_id)) == "done"


def _rows(engine, run_id: int):
    with engine.connect() as c:
        return c.execute(
            select(
                PairwiseVerdict.tile_first,
                PairwiseVerdict.tile_second,
                PairwiseVerdict.status,
                PairwiseVerdict.attempts,
                PairwiseVerdict.first_wins,
                PairwiseVerdict.worker,
                PairwiseVerdict.error,
            )
            .where(PairwiseVerdict.run_id == run_id)
            .order_by(PairwiseVerdict.query_id, PairwiseVerdict.tile_first, PairwiseVerdict.tile_second)
        ).all()


def _ranking(engine, run_id: int) -> list[tuple[int, int]]:
    with engine.connect() as c:
        return c.execute(
            select(Ranking.query_id, Ranking.tile_id)
            .where(Ranking.run_id == run_id)
            .order_by(Ranking.query_id, Ranking.rank)
        ).all()


def test_resume_while_the_only_judgment_is_judged_spends_no_attempt(stack_env, dataset, pg_url, workers):
    """The issue's reproduction: one query, two candidates, a slow judge, three resumes a second apart."""
    cli(stack_env, "ingest", str(dataset))
    cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    workers(["coordination"], "coordinator")
    judges = [workers(["vlm.simulated"], f"vlm-simulated-{i}", app="workers.app") for i in range(2)]
    one = ["--queries", "1", "--k", "2", "--max-attempts", "3"]
    run_id = _run_id(cli(stack_env, *SUBMIT, *one, "--latency-ms", "4000"))
    wait_for(lambda: any(r.attempts == 1 for r in _rows(engine, run_id)), 30, "the judgment to be taken")
    for _ in range(3):
        resumed = cli(stack_env, "resume", str(run_id))  # the judgment runs under a live lease: not stale
        assert f"run {run_id}: re-sent 0 stale judgments" in resumed.stdout
        time.sleep(1.0)
    # A duplicate delivery all the same (as a redelivered message would be): it costs nothing.
    (first,) = _rows(engine, run_id)
    with engine.connect() as c:
        (row_id,) = c.scalars(select(PairwiseVerdict.id).where(PairwiseVerdict.run_id == run_id))
    if first.status == "pending":
        with app.connection_for_write(stack_env["CVGL_BROKER_URL"]) as conn:
            app.send_task("cvgl.judge_pairwise", args=[[row_id]], queue="vlm.simulated", connection=conn)
    wait_for(lambda: _done(engine, run_id), 60, "the run to finish")
    (row,) = _rows(engine, run_id)
    assert (row.status, row.attempts, row.error) == ("done", 1, None)
    deferred = sum(j.log.read_text().count("duplicate delivery deferred") for j in judges)
    assert first.status != "pending" or deferred >= 1  # the duplicate was delivered, and cost nothing

    reference = _run_id(cli(stack_env, *SUBMIT, *one, "--wait"))
    assert _ranking(engine, run_id) == _ranking(engine, reference)
    engine.dispose()


def test_a_frozen_worker_past_the_visibility_timeout_changes_nothing_when_it_wakes(
    stack_env, dataset, pg_url, workers
):
    env = {**stack_env, "CVGL_LEASE_SECONDS": "3"}
    cli(env, "ingest", str(dataset))
    cli(env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    workers(["coordination"], "coordinator")
    frozen = workers(["vlm.simulated"], "vlm-simulated-frozen", app="workers.app")
    # Only the worker to be frozen runs at first, so it certainly holds a batch.
    run_id = _run_id(
        cli(env, *SUBMIT, "--queries", "6", "--k", "6", "--batch-size", "4", "--latency-ms", "500")
    )
    wait_for(
        lambda: any(r.attempts == 1 and r.status == "pending" for r in _rows(engine, run_id)),
        30,
        "a batch in hand",
    )
    (child,) = frozen.children()
    os.kill(child.pid, signal.SIGSTOP)
    try:
        with engine.connect() as c:
            held = set(
                c.scalars(
                    select(PairwiseVerdict.id).where(
                        PairwiseVerdict.run_id == run_id,
                        PairwiseVerdict.status == "pending",
                        PairwiseVerdict.leased_by.like(f"%:{child.pid}:%"),
                    )
                )
            )
        assert held
        workers(["vlm.simulated"], "vlm-simulated-live", app="workers.app")
        # The visibility timeout (8 s) brings the frozen batch back; its lease (3 s) has lapsed.
        wait_for(lambda: _done(engine, run_id), 90, "the run to finish without the frozen worker")
    finally:
        os.kill(child.pid, signal.SIGCONT)

    def stored() -> list:
        with engine.connect() as c:
            columns = (
                PairwiseVerdict.id,
                PairwiseVerdict.worker,
                PairwiseVerdict.first_wins,
                PairwiseVerdict.finished_at,
            )
            return c.execute(select(*columns).where(PairwiseVerdict.id.in_(held))).all()

    before = stored()
    assert all(r.worker.startswith("vlm-simulated-live@") for r in before)  # finished elsewhere
    time.sleep(3)  # the frozen worker wakes, finishes its batch, tries to store it
    after = stored()
    assert after == before
    rows = _rows(engine, run_id)
    assert all(r.status == "done" for r in rows)
    assert max(r.attempts for r in rows) == 2  # the frozen batch: one more attempt, not a failure
    reference = _run_id(cli(env, *SUBMIT, "--queries", "6", "--k", "6", "--wait"))
    assert _ranking(engine, run_id) == _ranking(engine, reference)
    engine.dispose()


def test_no_session_holds_row_locks_for_long(pg_url, monkeypatch):
    """A session idle inside a write transaction (its worker frozen) is ended by the server; a
    statement waiting on its locks gives up instead of waiting for ever."""
    monkeypatch.setenv("CVGL_DB_IDLE_IN_TRANSACTION_TIMEOUT", "1")
    monkeypatch.setenv("CVGL_DB_LOCK_TIMEOUT", "0.3")
    engine = make_engine(pg_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE lock_probe (id int PRIMARY KEY, v int)"))
        c.execute(text("INSERT INTO lock_probe VALUES (1, 0)"))
    frozen = engine.connect()
    frozen.begin()
    frozen.execute(text("UPDATE lock_probe SET v = 1 WHERE id = 1"))  # holds the row lock, then idles
    t0 = time.monotonic()
    with pytest.raises(DBAPIError, match="lock timeout"):
        with engine.begin() as c:
            c.execute(text("UPDATE lock_probe SET v = 2 WHERE id = 1"))
    assert time.monotonic() - t0 < 1.0  # gave up after the lock timeout, not never
    time.sleep(1.5)  # past the idle-in-transaction timeout: the server ended the frozen session
    with engine.begin() as c:
        c.execute(text("UPDATE lock_probe SET v = 2 WHERE id = 1"))
    with pytest.raises(DBAPIError):
        frozen.execute(text("SELECT 1"))
    frozen.close()
    with engine.connect() as c:
        assert c.scalar(text("SELECT v FROM lock_probe")) == 2
    engine.dispose()


def test_a_batch_past_its_time_limit_is_stopped_and_retried_one_judgment_at_a_time(
    stack_env, dataset, pg_url, workers
):
    # 1 s plus 0.05 s a judgment: a first-round batch (several at 0.4 s each) is stopped; one alone fits.
    env = {**stack_env, "CVGL_TASK_TIME_LIMIT_BASE": "1", "CVGL_JUDGMENT_TIME_LIMIT": "0.05"}
    cli(env, "ingest", str(dataset))
    cli(env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    workers(["coordination"], "coordinator")
    judge = workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    run_id = _run_id(
        cli(
            env,
            *SUBMIT,
            "--queries",
            "2",
            "--k",
            "6",
            "--batch-size",
            "8",
            "--latency-ms",
            "400",
            "--wait",
            timeout=240,
        )
    )
    assert _done(engine, run_id)
    log = judge.log.read_text()
    assert re.search(r"Hard time limit \(1\.\d+s\) exceeded for cvgl.judge_pairwise", log)
    rows = _rows(engine, run_id)
    assert all(r.status == "done" for r in rows)
    assert sorted({r.attempts for r in rows}) == [1, 2]  # the stopped batch's judgments, once more each
    reference = _run_id(cli(env, *SUBMIT, "--queries", "2", "--k", "6", "--wait"))
    assert _ranking(engine, run_id) == _ranking(engine, reference)
    engine.dispose()
