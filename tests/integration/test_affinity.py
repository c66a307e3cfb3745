"""Query affinity over real Redis and Celery workers: with per-GPU queues (CVGL_VLM_SHARDS), each
query's judgments go to one queue; a worker reads its own queue first and the others only when
its own is empty, so a query stays with the worker that holds its prefixes, and the queries of a
worker that is gone still finish on the others."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, func, select

from db.models import PairwiseVerdict, Run
from tests.integration.conftest import cli
from workers.queues import shard_of, worker_queues

pytestmark = pytest.mark.integration

QUEUE = "vlm.simulated"


def _wait_done(engine, run_id: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as c:
            if c.scalar(select(Run.status).where(Run.id == run_id)) == "done":
                return
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} not done")


def _submit(env: dict[str, str], *extra: str) -> int:
    out = cli(env, "submit", "--queries", "16", "--k", "8", "--batch-size", "3", "--accuracy", "0.9", *extra)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def sharded(stack_env, dataset):
    env = {**stack_env, "CVGL_VLM_SHARDS": "2"}
    cli(env, "ingest", str(dataset))
    cli(env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    return env


def test_a_worker_serves_its_own_queue_first_and_the_others_when_it_is_empty(sharded, pg_url, workers):
    engine = create_engine(pg_url)
    run_id = _submit(sharded)  # no judgment worker yet: round 1 waits in both queues
    with engine.connect() as c:
        first_round = dict(
            c.execute(
                select(PairwiseVerdict.id, PairwiseVerdict.query_id).where(PairwiseVerdict.run_id == run_id)
            ).all()
        )
    own = {i for i, q in first_round.items() if shard_of(q, 2) == 1}
    assert own and len(own) < len(first_round)  # both queues hold work

    # The only judgment worker: its own queue is shard 1; shard 0's worker never came.
    workers(["coordination"], "coordinator")
    workers(worker_queues(QUEUE, 2, home=1), "vlm-simulated-gpu1", app="workers.app")
    _wait_done(engine, run_id)

    with engine.connect() as c:
        order = [
            i
            for (i,) in c.execute(
                select(PairwiseVerdict.id)
                .where(PairwiseVerdict.run_id == run_id)
                .order_by(PairwiseVerdict.finished_at)
            )
        ]
        failed = c.scalar(
            select(func.count()).where(PairwiseVerdict.run_id == run_id, PairwiseVerdict.status != "done")
        )
    # Its own queue's first round was judged before anything of the other queue...
    stolen = [i for i in order if i in first_round and i not in own]
    assert max(order.index(i) for i in own) < min(order.index(i) for i in stolen)
    # ...and the other queue's queries finished all the same, on this worker.
    assert failed == 0


def test_two_workers_keep_their_queries(sharded, pg_url, workers):
    engine = create_engine(pg_url)
    workers(["coordination"], "coordinator")
    for gpu in (0, 1):
        workers(worker_queues(QUEUE, 2, home=gpu), f"vlm-simulated-gpu{gpu}", app="workers.app")
    run_id = _submit(sharded, "--latency-ms", "20")
    _wait_done(engine, run_id)
    with engine.connect() as c:
        rows = c.execute(
            select(PairwiseVerdict.query_id, PairwiseVerdict.worker).where(PairwiseVerdict.run_id == run_id)
        ).all()
    home = sum(1 for q, w in rows if w.startswith(f"vlm-simulated-gpu{shard_of(q, 2)}@"))
    # A worker that runs dry between rounds helps the other: affinity, not a pinning.
    # Both busy, each mostly on its own queue (85% here); without affinity it would be a coin flip.
    assert home / len(rows) > 0.6, f"{home} of {len(rows)} judgments on the query's own worker"
