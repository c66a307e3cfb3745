"""A run's life with Redis and Celery workers: resume re-sends only stale judgments, watch sends
nothing, Ctrl-C leaves the run going and says how to follow it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import create_engine, select

from db.models import PairwiseVerdict
from tests.integration.conftest import REPO, cli

pytestmark = pytest.mark.integration

QUEUE = "vlm.simulated"


def _attempts(engine, run_id: int) -> list[tuple[str, int]]:
    with engine.connect() as c:
        return c.execute(
            select(PairwiseVerdict.status, PairwiseVerdict.attempts).where(PairwiseVerdict.run_id == run_id)
        ).all()


def test_resume_sends_only_stale_judgments_and_watch_sends_nothing(stack_env, dataset, pg_url, workers):
    cli(stack_env, "ingest", str(dataset))
    cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    broker = redis.Redis.from_url(stack_env["CVGL_BROKER_URL"])
    # No worker yet: the first round waits in the queue.
    submitted = cli(stack_env, "submit", "--queries", "4", "--k", "5", "--batch-size", "3", "--no-reuse")
    run_id = int(submitted.stdout.strip().splitlines()[-1])
    queued = broker.llen(QUEUE)
    pending = len(_attempts(engine, run_id))
    assert queued == -(-pending // 3) > 0  # ceil: one message per batch of 3

    resumed = cli(stack_env, "resume", str(run_id))
    assert f"run {run_id}: re-sent 0 stale judgments" in resumed.stdout
    assert broker.llen(QUEUE) == queued  # still queued: not sent again

    # Ctrl-C while watching: the run is left as it is, and the user is told how to go on.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "watch", str(run_id)],
        env=stack_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ctrl-C once it follows the run (its bar is on stderr), not while Python is still importing.
    first = os.read(watcher.stderr.fileno(), 256).decode()
    time.sleep(1)  # a few polls
    watcher.send_signal(signal.SIGINT)
    _, err = watcher.communicate(timeout=30)
    err = first + err
    assert watcher.returncode == 130, err
    for command in (f"orchestrator watch {run_id}", f"orchestrator resume {run_id}", f"orchestrator cancel {run_id}"):
        assert command in err
    assert "Traceback" not in err and "Aborted!" not in err
    assert broker.llen(QUEUE) == queued and {a for _, a in _attempts(engine, run_id)} == {0}

    broker.delete(QUEUE)  # the messages are lost (a Redis restart without persistence)
    resumed = cli(stack_env, "resume", str(run_id))
    assert f"run {run_id}: re-sent {pending} stale judgments" in resumed.stdout
    assert broker.llen(QUEUE) == queued

    workers(["coordination"], "coordinator")
    workers([QUEUE], "vlm-simulated", app="workers.app")
    watched = cli(stack_env, "watch", str(run_id), timeout=120)
    assert watched.stdout.strip().startswith(f"run {run_id} done: 4/4 queries")
    rows = _attempts(engine, run_id)
    assert {s for s, _ in rows} == {"done"} and {a for _, a in rows} == {1}  # no second attempt
    engine.dispose()
