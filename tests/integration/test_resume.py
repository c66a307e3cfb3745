"""Kill the worker mid-batch and the coordinator mid-run; the run resumes to the same rankings."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, func, select

from db.models import PairwiseVerdict, Ranking, Run
from tests.integration.conftest import REPO, cli, wait_for

pytestmark = pytest.mark.integration

SUBMIT = ["submit", "--strategy", "pairwise", "--accuracy", "0.8", "--seed", "7", "--batch-size", "24"]


def _rankings(engine, run_id: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    with engine.connect() as c:
        for q, t in c.execute(
            select(Ranking.query_id, Ranking.tile_id)
            .where(Ranking.run_id == run_id)
            .order_by(Ranking.query_id, Ranking.rank)
        ):
            out.setdefault(q, []).append(t)
    return out


def _verdict_keys(engine, run_id: int) -> list[tuple[int, int, int]]:
    with engine.connect() as c:
        return sorted(
            c.execute(
                select(
                    PairwiseVerdict.query_id, PairwiseVerdict.tile_first, PairwiseVerdict.tile_second
                ).where(PairwiseVerdict.run_id == run_id)
            ).all()
        )


def test_run_survives_worker_and_coordinator_kills(stack_env, dataset, pg_url, workers):
    cli(stack_env, "ingest", str(dataset))
    cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    judge_worker = workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    coordinator = workers(["coordination"], "coordinator")

    # The orchestrator waits on the run in the foreground, as a user's terminal would.
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *SUBMIT, "--latency-ms", "8", "--wait"],
        env=stack_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    with engine.connect() as c:
        wait_for(lambda: c.scalar(select(func.max(Run.id))) is not None, 30, "run not created", poll=0.05)
        run_id = c.scalar(select(func.max(Run.id)))

    def count(status: str) -> int:
        with engine.connect() as c:
            return c.scalar(
                select(func.count())
                .select_from(PairwiseVerdict)
                .where(PairwiseVerdict.run_id == run_id, PairwiseVerdict.status == status)
            )

    def claimed_in_flight() -> bool:  # a batch is being judged: claimed (attempts counted), not stored
        with engine.connect() as c:
            return bool(
                c.scalar(
                    select(func.count())
                    .select_from(PairwiseVerdict)
                    .where(
                        PairwiseVerdict.run_id == run_id,
                        PairwiseVerdict.status == "pending",
                        PairwiseVerdict.attempts >= 1,
                    )
                )
            )

    wait_for(lambda: count("done") >= 150 and claimed_in_flight(), 120, "no batch in flight", poll=0.05)
    judge_worker.kill_child()  # SIGKILL in the middle of a batch; the parent forks a new child
    time.sleep(0.3)
    coordinator.kill()  # the coordination worker dies too ...
    orchestrator.send_signal(signal.SIGKILL)  # ... and the orchestrator the user was watching
    orchestrator.wait(timeout=10)
    done_at_kill = count("done")
    time.sleep(1.0)
    workers(["coordination"], "coordinator-2")  # restart
    # A second judge worker shares the rest of the run (thousands of 8 ms judgments).
    workers(["vlm.simulated"], "vlm-simulated-2", app="workers.app")
    resumed = cli(stack_env, "resume", str(run_id), "--wait", timeout=240)
    assert f"run {run_id}" in resumed.stdout

    with engine.connect() as c:
        assert c.scalar(select(Run.status).where(Run.id == run_id)) == "done"
        assert (
            c.scalar(select(func.max(PairwiseVerdict.attempts)).where(PairwiseVerdict.run_id == run_id)) >= 2
        )
    assert count("pending") == 0 and count("failed") == 0
    assert count("done") > done_at_kill

    # The same judge and seed, uninterrupted.
    reference = int(cli(stack_env, *SUBMIT, "--wait", timeout=240).stdout.split()[-1])
    assert _rankings(engine, run_id) == _rankings(engine, reference)
    assert len(_rankings(engine, run_id)) == 40
    keys = _verdict_keys(engine, run_id)
    assert len(keys) == len(set(keys)), "a judgment row is duplicated"
    assert keys == _verdict_keys(engine, reference), "a comparison is missing or extra"
    engine.dispose()
