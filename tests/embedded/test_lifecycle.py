"""A run's life from the command line, embedded (SQLite, in-process broker): watch, cancel, Ctrl-C."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from db.engine import session_factory
from db.models import PairwiseVerdict, Run
from orchestrator import drive
from orchestrator.cli import cli
from orchestrator.coordinator import advance
from orchestrator.submit import RunSpec, create_run
from workers.tasks import judge_pairwise

REPO = Path(__file__).resolve().parents[2]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def stored(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.chdir(tmp_path)
    assert run("synth", "data", "--queries", "6", "--k", "5").exit_code == 0
    assert run("ingest", "data").exit_code == 0
    assert run("import-candidates", "data/candidates.csv", "--name", "c").exit_code == 0
    return tmp_path


def _unserved_run(**spec) -> int:  # no reuse: every judgment is asked
    """A run stored and started (its first judgments sent on the in-process broker) that no worker
    serves: what a Ctrl-C'd embedded `submit --wait` leaves."""
    sf = session_factory()
    with sf.begin() as s:
        run_id = create_run(s, RunSpec(k=5, n_queries=6, reuse=False, **spec))
    advance(run_id, sessions=sf)
    return run_id


def _judgments(run_id: int):
    with session_factory()() as s:
        return s.execute(
            select(PairwiseVerdict.id, PairwiseVerdict.status, PairwiseVerdict.attempts, PairwiseVerdict.error)
            .where(PairwiseVerdict.run_id == run_id)
            .order_by(PairwiseVerdict.id)
        ).all()


def test_cancel_closes_pending_judgments_and_is_safe_twice(stored):
    run_id = _unserved_run()
    pending = [r.id for r in _judgments(run_id) if r.status == "pending"]
    assert pending

    first = run("cancel", str(run_id))
    assert first.exit_code == 0, first.output
    assert first.output.strip() == f"run {run_id} cancelled: {len(pending)} pending judgments will not be judged"
    again = run("cancel", str(run_id))
    assert (again.exit_code, again.output.strip()) == (0, f"run {run_id} is already cancelled")

    assert {(r.status, r.error) for r in _judgments(run_id)} == {("failed", "run cancelled")}
    status = run("status", str(run_id))
    assert status.output.splitlines()[1].split()[1] == "cancelled"
    # A worker delivered one of them judges nothing; the coordinator creates nothing new.
    assert judge_pairwise.apply(args=[pending]).result == 0
    before = len(_judgments(run_id))
    assert advance(run_id, sessions=session_factory()).new_judgments == 0
    assert len(_judgments(run_id)) == before

    for command in (["resume", str(run_id)], ["watch", str(run_id)]):
        refused = run(*command)
        assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
        assert f"run {run_id} was cancelled" in refused.output
    done = run("cancel", "1") if run_id != 1 else None
    assert done is None or done.exit_code == 1


def test_cancel_of_a_finished_run_refuses_in_one_line(stored):
    assert run("submit", "--k", "5", "--queries", "2").exit_code == 0
    out = run("cancel", "1")
    assert out.exit_code == 1 and out.output.strip() == "Error: run 1 is done; there is nothing to cancel"
    assert run("cancel", "99").output.strip() == "Error: run 99 does not exist"


def test_watch_follows_a_done_run_and_names_resume_when_nothing_serves_it(stored, monkeypatch):
    assert run("submit", "--k", "5", "--queries", "2").exit_code == 0
    done = run("watch", "1")
    assert done.exit_code == 0 and done.output.rstrip().endswith("\nrun 1 done: 2/2 queries, 10 judgments (0 reused), 0 failed".lstrip("\n")), done.output

    monkeypatch.setattr(drive, "EMBEDDED_STALL_SECONDS", 0.5)
    run_id = _unserved_run()
    before = _judgments(run_id)
    stalled = run("watch", str(run_id))
    assert stalled.exit_code == 1, stalled.output
    last = stalled.output.strip().splitlines()[-1].split("\r")[-1]
    assert f"run {run_id} made no progress" in last and f"`orchestrator resume {run_id}`" in last
    assert "Traceback" not in stalled.output
    assert _judgments(run_id) == before  # read-only: nothing taken, sent or attempted

    # The first judgments are still on the in-process queue: resume sends none of them again.
    resumed = run("resume", str(run_id), "--wait")
    assert resumed.exit_code == 0, resumed.output
    assert f"run {run_id}: re-sent 0 stale judgments" in resumed.output
    rows = _judgments(run_id)
    assert {r.status for r in rows} == {"done"} and {r.attempts for r in rows} == {1}


def test_ctrl_c_during_submit_wait_leaves_the_run_and_says_how_to_continue(stored):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "submit", "--k", "5", "--queries", "6", "--batch-size", "1",
         "--latency-ms", "200", "--wait"],  # fmt: skip
        env=env,
        cwd=stored,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = stored / "cvgl.sqlite3"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until some judgments are stored
        try:
            with sqlite3.connect(db) as c:
                if c.execute("SELECT COUNT(*) FROM pairwise_verdicts WHERE status = 'done'").fetchone()[0]:
                    break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no judgment was stored")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "orchestrator resume 1 --wait" in err and "orchestrator cancel 1" in err
    assert "Traceback" not in err and "Aborted!" not in err

    with session_factory()() as s:
        assert s.scalar(select(Run.status).where(Run.id == 1)) == "running"
        assert s.scalar(select(func.count()).select_from(PairwiseVerdict).where(PairwiseVerdict.status == "pending"))
    resumed = run("resume", "1", "--wait")
    assert resumed.exit_code == 0 and "(run done)" in resumed.output or run("status", "1").output.count("done")
    with session_factory()() as s:
        assert s.scalar(select(Run.status).where(Run.id == 1)) == "done"
