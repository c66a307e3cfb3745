"""Leases on judgment rows (db/leases.py), on a real SQLite database: a duplicate delivery costs
nothing, a dead or frozen holder's row is taken again with an attempt, spent rows fail, and only
the holder stores a result."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

import orchestrator.coordinator as coordinator
from db import leases
from db.engine import session_factory
from db.models import PairwiseVerdict
from db.queries import record_outcomes
from orchestrator.cli import cli
from orchestrator.submit import RunSpec, create_run

TABLE = PairwiseVerdict.__table__
ELSEWHERE = "gpu-box-7:4242:beef"  # a worker on another host: never known dead, its lease must lapse
GIVE_UP = "gave up after 3 attempts: each time, its worker died or froze while judging it"


@pytest.fixture
def rows(tmp_path, monkeypatch):
    """The first round's pending verdict ids of a small run (nothing consumes them)."""
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.setenv("CVGL_LEASE_SECONDS", "30")
    monkeypatch.chdir(tmp_path)
    for args in (
        ("synth", "data", "--queries", "3", "--k", "4"),
        ("ingest", "data"),
        ("import-candidates", "data/candidates.csv", "--name", "c"),
    ):
        assert CliRunner().invoke(cli, list(args)).exit_code == 0
    sf = session_factory()
    with sf.begin() as s:
        run_id = create_run(s, RunSpec(k=4, n_queries=None, max_attempts=3))
    coordinator.advance(run_id, sessions=sf)
    with sf() as s:
        ids = sorted(s.scalars(select(PairwiseVerdict.id)))
    assert len(ids) >= 4
    return sf, ids


def read(sf, ids):
    with sf() as s:
        return s.execute(
            select(
                PairwiseVerdict.id,
                PairwiseVerdict.attempts,
                PairwiseVerdict.leased_by,
                PairwiseVerdict.lease_until,
            )
            .where(PairwiseVerdict.id.in_(ids), PairwiseVerdict.status == "pending")
            .order_by(PairwiseVerdict.id)
        ).all()


def claim(sf, ids, me, **kw):
    with sf.begin() as s:
        return leases.claim(s, TABLE, read(sf, ids), me=me, max_attempts=3, give_up=GIVE_UP, **kw)


def state(sf, row_id):
    with sf() as s:
        return s.execute(
            select(
                PairwiseVerdict.status,
                PairwiseVerdict.attempts,
                PairwiseVerdict.leased_by,
                PairwiseVerdict.error,
            ).where(PairwiseVerdict.id == row_id)
        ).one()


def dead_holder() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:dead"


def test_a_duplicate_delivery_of_a_row_being_judged_costs_nothing(rows):
    sf, ids = rows
    first = claim(sf, ids, ELSEWHERE)
    assert first.fresh == ids and not first.busy
    assert {state(sf, i).attempts for i in ids} == {1}
    me = leases.holder()
    for _ in range(3):  # resume, resume, resume
        dup = claim(sf, ids, me)
        assert dup.busy == ids and not (dup.fresh or dup.mine or dup.recovered or dup.spent)
    assert {state(sf, i).attempts for i in ids} == {1}  # no attempt spent
    assert {state(sf, i).leased_by for i in ids} == {ELSEWHERE}


def test_the_holder_itself_and_a_handed_over_retry_keep_the_lease_without_an_attempt(rows):
    sf, ids = rows
    me = leases.holder()
    claim(sf, ids[:2], me)
    again = claim(sf, ids[:2], me)  # a retry after a database error, in this process
    assert again.mine == ids[:2] and state(sf, ids[0]).attempts == 1
    claim(sf, ids[2:], ELSEWHERE)
    adopted = claim(sf, ids[2:], me, adopt=[ELSEWHERE])  # the retry of another process's task
    assert adopted.mine == ids[2:] and {state(sf, i).attempts for i in ids[2:]} == {1}
    assert {state(sf, i).leased_by for i in ids} == {me}


def test_a_lapsed_or_dead_holder_is_taken_over_one_row_at_a_time(rows):
    sf, ids = rows
    claim(sf, ids[:1], ELSEWHERE)
    claim(sf, ids[1:2], dead_holder())
    with sf.begin() as s:  # the remote holder froze: its lease ran out
        s.execute(
            update(TABLE)
            .where(TABLE.c.id == ids[0])
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    me = leases.holder()
    found = claim(sf, ids[:2], me)
    assert found.recovered == ids[:2] and not found.fresh
    assert [state(sf, i).attempts for i in ids[:2]] == [1, 1]  # nothing taken yet
    for row_id in ids[:2]:
        with sf.begin() as s:
            assert leases.take_one(s, TABLE, row_id, me=me, max_attempts=3, give_up=GIVE_UP)
    assert [state(sf, i)[1:3] for i in ids[:2]] == [(2, me), (2, me)]
    with sf.begin() as s:  # a second delivery racing for it finds it taken
        assert not leases.take_one(s, TABLE, ids[0], me=ELSEWHERE, max_attempts=3, give_up=GIVE_UP)


def test_a_row_whose_worker_died_every_time_fails_after_max_attempts(rows):
    sf, ids = rows
    row = ids[:1]
    for attempt in range(1, 4):
        holder = dead_holder()
        c = claim(sf, row, holder)
        if attempt == 1:
            assert c.fresh == row
        else:
            assert c.recovered == row
            with sf.begin() as s:
                assert leases.take_one(s, TABLE, row[0], me=holder, max_attempts=3, give_up=GIVE_UP)
        assert state(sf, row[0]).attempts == attempt
    final = claim(sf, row, leases.holder())
    assert final.spent == row
    status, attempts, leased_by, error = state(sf, row[0])
    assert (status, attempts, leased_by, error) == ("failed", 3, None, GIVE_UP)


def test_a_racing_claim_decided_on_a_stale_read_takes_nothing(rows):
    sf, ids = rows
    stale = read(sf, ids)  # both deliveries read the rows free...
    with sf.begin() as s:
        assert leases.claim(s, TABLE, stale, me=ELSEWHERE, max_attempts=3, give_up=GIVE_UP).fresh == ids
    with sf.begin() as s:  # ...the second one's guarded update finds them taken
        late = leases.claim(s, TABLE, stale, me=leases.holder(), max_attempts=3, give_up=GIVE_UP)
    assert late.busy == ids and not late.fresh
    assert {state(sf, i).attempts for i in ids} == {1}


def test_only_the_lease_holder_stores_a_result(rows):
    sf, ids = rows
    me = leases.holder()
    claim(sf, ids[:1], me)
    outcome = [{"id": ids[0], "status": "done", "first_wins": True}]
    with sf.begin() as s:  # a frozen worker waking up after another took its row over
        assert record_outcomes(s, "pairwise", outcome, worker="w", model_revision="r", holder=ELSEWHERE) == 0
    with sf.begin() as s:
        assert record_outcomes(s, "pairwise", outcome, worker="w", model_revision="r", holder=me) == 1
    assert state(sf, ids[0]).status == "done"


def test_the_keeper_renews_leases_while_the_work_runs(rows, monkeypatch):
    sf, ids = rows
    monkeypatch.setenv("CVGL_LEASE_SECONDS", "0.4")
    me = leases.holder()
    claim(sf, ids[:1], me)
    before = read(sf, ids[:1])[0].lease_until
    with leases.LeaseKeeper(sf, TABLE, me) as keeper:
        keeper.hold(ids[:1])
        time.sleep(0.6)  # past the first lease: renewed every 0.1 s
        during = read(sf, ids[:1])[0].lease_until
        assert during > before
        assert claim(sf, ids[:1], ELSEWHERE).busy == ids[:1]  # still held
    time.sleep(0.5)
    assert claim(sf, ids[:1], ELSEWHERE).recovered == ids[:1]  # no keeper: it lapsed
