"""Fault injection: one pairwise run survives five faults with nothing lost or duplicated.

In one run on its own PostgreSQL, Redis and prefork Celery workers: a poison judgment that kills
its worker every time; SIGKILL of the worker child in the middle of a batch; Redis stopped and
restarted empty; PostgreSQL restarted in the middle of writes; the coordinator and the orchestrator
killed and restarted. The final rankings must equal a fault-free run's with the same judge and
seed, with 0 lost and 0 duplicated judgment rows and at most one batch re-done per fault.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from db.models import PairwiseVerdict, Ranking, Run
from orchestrator.strategies.mergesort import MergeSort
from tests.builders import candidates_from_csv, positives_from_files, synthetic_dataset
from tests.faults.stack import Stack
from tests.integration.conftest import REPO, cli
from workers.judges.simulated import SimulatedJudge

pytestmark = pytest.mark.integration

SEED, ACCURACY, BATCH, MAX_ATTEMPTS = 11, 0.8, 16, 4


def poison_key(dataset: Path) -> str:
    """A comparison the run will ask early whose honest verdict is "first wins", so recording it as
    failed (which keeps the order shown) leaves the final ranking unchanged."""
    stage1 = candidates_from_csv(dataset / "candidates.csv")
    positives = positives_from_files(dataset)
    judge = SimulatedJudge(seed=SEED, accuracy=ACCURACY)
    for query in sorted(stage1):
        order = stage1[query]
        for a, b in MergeSort().replay(order, {}).items:
            ctx = {
                "query": query,
                "tiles": (a, b),
                "positive": (a == positives[query], b == positives[query]),
                "stage1_rank": (order.index(a) + 1, order.index(b) + 1),
            }
            if judge.p_first(ctx) > 0.5:
                return f"{query}|{a}|{b}"
    raise AssertionError("no suitable poison comparison")


def test_one_run_survives_every_fault(tmp_path, capsys):
    dataset = synthetic_dataset(tmp_path / "VIGOR", n_queries=40)
    stack = Stack(tmp_path)
    try:
        _run_faults(stack, dataset, capsys)
    finally:
        stack.close()


def _run_faults(stack: Stack, dataset: Path, capsys) -> None:
    env = stack.env
    cli(env, "ingest", str(dataset))
    cli(env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    judge_worker = stack.worker(["vlm.simulated"], "vlm-simulated", "workers.app")
    coordinator = stack.worker(["coordination"], "coordinator", "orchestrator.tasks")
    poison = poison_key(dataset)
    common = [
        "submit",
        "--strategy",
        "pairwise",
        "--all-queries",
        "--seed",
        str(SEED),
        "--accuracy",
        str(ACCURACY),
        "--batch-size",
        str(BATCH),
        "--max-attempts",
        str(MAX_ATTEMPTS),
    ]
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *common, "--latency-ms", "4", "--poison", poison, "--wait"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_id = None
    while run_id is None:
        run_id = stack.scalar(select(func.max(Run.id)))
        time.sleep(0.1)
    v = PairwiseVerdict

    def done() -> int:
        return stack.scalar(select(func.count()).select_from(v).where(v.run_id == run_id, v.status == "done"))

    def in_flight() -> bool:
        return bool(
            stack.scalar(
                select(func.count())
                .select_from(v)
                .where(v.run_id == run_id, v.status == "pending", v.attempts >= 1)
            )
        )

    def wait_until(pred, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.05)

    recovery: dict[str, float] = {}  # fault -> seconds until another full batch was stored

    def inject(name: str, action, then=None) -> None:
        base = done()
        wait_until(lambda: done() >= base + 150 and in_flight(), f"no batch in flight before {name}")
        stored, t0 = done(), time.monotonic()
        action()
        if then is not None:
            then()
        wait_until(lambda: done() >= stored + BATCH, f"no progress after {name}")
        recovery[name] = time.monotonic() - t0

    inject("worker child SIGKILL mid-batch", judge_worker.kill_child)

    def redis_restart_empty() -> None:
        stack.redis.stop()
        stack.redis.wipe()
        stack.redis.start(appendonly=False)

    inject("Redis restarted empty", redis_restart_empty)
    inject("PostgreSQL restarted mid-writes", stack.pg.restart)

    def kill_coordination() -> None:
        coordinator.kill()
        orchestrator.kill()
        orchestrator.wait(timeout=10)

    resume: list[subprocess.Popen] = []

    def restart_coordination() -> None:
        stack.worker(["coordination"], "coordinator-2", "orchestrator.tasks")
        resume.append(
            subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "resume", str(run_id), "--wait"],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )

    inject("coordinator and orchestrator SIGKILL", kill_coordination, then=restart_coordination)
    out, _ = resume[0].communicate(timeout=300)
    assert resume[0].returncode == 0 and f"run {run_id}" in out
    assert stack.scalar(select(Run.status).where(Run.id == run_id)) == "done"

    with stack.engine.connect() as c:
        rows = c.execute(
            select(v.query_id, v.tile_first, v.tile_second, v.status, v.attempts, v.error).where(
                v.run_id == run_id
            )
        ).all()
        dup = c.execute(
            text(
                "SELECT COUNT(*) FROM (SELECT 1 FROM pairwise_verdicts WHERE run_id = :r "
                "GROUP BY query_id, tile_first, tile_second HAVING COUNT(*) > 1) d"
            ),
            {"r": run_id},
        ).scalar()
    failed = [r for r in rows if r.status == "failed"]
    assert [r.status for r in rows if r.status == "pending"] == []
    assert len(failed) == 1 and failed[0].attempts == MAX_ATTEMPTS and "gave up" in failed[0].error
    assert dup == 0
    n_faults = len(recovery) + 1  # + the poison judgment
    redone = sum(max(0, r.attempts - 1) for r in rows if r.status == "done")
    assert redone <= n_faults * BATCH, f"{redone} judgments re-done for {n_faults} faults"

    # The same judge and seed without faults (and without reusing the faulty run's verdicts).
    reference = int(cli(env, *common, "--no-reuse", "--wait", timeout=300).stdout.split()[-1])

    def rankings(r: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        with stack.engine.connect() as c:
            for q, t in c.execute(
                select(Ranking.query_id, Ranking.tile_id)
                .where(Ranking.run_id == r)
                .order_by(Ranking.query_id, Ranking.rank)
            ):
                out.setdefault(q, []).append(t)
        return out

    assert rankings(run_id) == rankings(reference)
    with stack.engine.connect() as c:
        ref_keys = set(
            c.execute(select(v.query_id, v.tile_first, v.tile_second).where(v.run_id == reference)).all()
        )
    assert {(r.query_id, r.tile_first, r.tile_second) for r in rows} == ref_keys, (
        "a judgment is lost or extra"
    )

    with capsys.disabled():
        print(f"\nfault suite: run {run_id}, {len(rows)} judgments, batch {BATCH}")
        print(f"  faults injected: {n_faults} ({', '.join(recovery)}, poison judgment)")
        for name, seconds in recovery.items():
            print(
                f"  time to recover from {name}: {seconds:.1f} s (until {BATCH} more judgments were stored)"
            )
        print(
            f"  judgments re-done: {redone} (bound {n_faults * BATCH}); failed: 1 poison after {MAX_ATTEMPTS} attempts"
        )
        print("  lost: 0, duplicated: 0, rankings identical to fault-free run", reference)
