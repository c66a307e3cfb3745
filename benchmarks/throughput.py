"""Full-stack throughput: judgments stored per second through orchestrator, coordinator, Redis,
PostgreSQL and Celery workers, with the simulated judge answering instantly. The rate is the run's
judgments over the time from the run's creation to its completion (database timestamps); the
rate seen from launching ``orchestrator submit --wait`` to its exit is printed beside it.

    python benchmarks/throughput.py [--queries 1000] [--workers 2] [--coordinators 1] [--batch-size 256] [--repeats 3]
                                    [--pg-stats]

Starts its own Redis and PostgreSQL on free loopback ports (as the tests do), a synthetic dataset,
judgment and coordination worker processes, then times pairwise runs from submit to done (median of
``--repeats``). In the same session it times a raw Celery no-op task with the same settings (late
acks, prefetch 1) at 1 and 50 items per task, and prints the ratio. Each run also reports the CPU
time of each process group per judgment and how many tasks carried the work; ``--pg-stats`` adds the
database statements that cost the server most (pg_stat_statements).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celery import Celery  # noqa: E402

from tests.services import PostgresServer, RedisServer, free_port  # noqa: E402
from workers.queues import ADVANCE_TASK, JUDGE_PAIRWISE_TASK  # noqa: E402

noop_app = Celery("cvgl-bench")
noop_app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_reject_on_worker_lost=True,
                     task_ignore_result=True, accept_content=["json"], task_serializer="json",
                     broker_url=os.environ.get("CVGL_BENCH_BROKER", "memory://"))


_counter = None


@noop_app.task(name="bench.noop")
def noop(items: list[int]) -> int:
    """Does one Redis INCRBY (the anchor measurement in shared/notes/queue-and-db.md)."""
    global _counter
    if _counter is None:
        import redis

        _counter = redis.Redis.from_url(noop_app.conf.broker_url)
    _counter.incrby("bench:done", len(items))
    return len(items)


def cpu_seconds(procs: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) used so far by each named group of processes and their children."""
    import psutil

    out = {}
    for name, pids in procs.items():
        total = 0.0
        for pid in pids:
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                total += t.children_user + t.children_system  # children that already exited
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        out[name] = total
    return out


def service_pids(redis_pid: int, pg_data: Path) -> dict[str, list[int]]:
    """This benchmark's own servers: the postmaster (its backends are children) and Redis."""
    postmaster = int((pg_data / "postmaster.pid").read_text().split()[0])
    return {"postgres": [postmaster], "redis": [redis_pid]}


def tasks_done(log: Path, name: str) -> int:
    """How many ``name`` tasks a worker's log says succeeded so far."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if f"Task {name}[" in line and "succeeded" in line)


def print_pg_stats(engine, judgments: int, top: int = 10) -> None:
    """The statements that cost the server most, per judgment stored."""
    from sqlalchemy import text

    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT calls, total_exec_time, total_plan_time, rows, query FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time + total_plan_time DESC LIMIT :top"), {"top": top}).all()
    print(f"\nPostgreSQL statements by server time (pg_stat_statements, {judgments} judgments):")
    print(f"  {'us/judgment':>11}  {'calls':>7}  {'rows':>9}  statement")
    for calls, exec_ms, plan_ms, n, query in rows:
        sql = " ".join(query.split())
        print(f"  {1000 * (exec_ms + plan_ms) / judgments:>11.1f}  {calls:>7}  {n:>9}  {sql[:110]}")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = log.open("ab")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while b"ready." not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.1)
    return proc


def orchestrator(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout


def raw_celery_rate(env: dict[str, str], work: Path, n_tasks: int, items: int) -> float:
    import redis

    env = {**env, "CVGL_BENCH_BROKER": env["CVGL_BROKER_URL"]}
    noop_app.conf.broker_url = env["CVGL_BROKER_URL"]
    r = redis.Redis.from_url(env["CVGL_BROKER_URL"])
    r.delete("bench:done")
    worker = start([sys.executable, "-m", "celery", "-A", "benchmarks.throughput:noop_app", "worker", "-P", "prefork",
                    "-c", "1", "-Q", "bench", "-n", f"bench{items}@%h", "--without-gossip", "--without-mingle",
                    "--loglevel", "INFO"],
                   env, work / f"noop{items}.log")
    try:
        t0 = time.perf_counter()
        for _ in range(n_tasks):
            noop.apply_async(args=[list(range(items))], queue="bench")
        while int(r.get("bench:done") or 0) < n_tasks * items:
            time.sleep(0.01)
        return n_tasks * items / (time.perf_counter() - t0)
    finally:
        worker.terminate()
        worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="judgment worker processes")
    ap.add_argument("--coordinators", type=int, default=1, help="coordination worker processes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pg-stats", action="store_true", help="print the costliest SQL statements")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cvgl-bench-"))
    redis_srv = RedisServer(work / "redis", free_port()).start(appendonly=False)
    pg = PostgresServer(None, free_port())
    pg.start(**({"shared_preload_libraries": "pg_stat_statements"} if args.pg_stats else {}))
    procs: list[subprocess.Popen] = []
    try:
        from sqlalchemy import create_engine, text

        admin = create_engine(pg.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("CREATE DATABASE cvgl"))
        admin.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
        env.update(CVGL_DATABASE_URL=pg.url("cvgl"), CVGL_BROKER_URL=redis_srv.url, CVGL_HOME=str(work / "home"),
                   PYTHONPATH=str(REPO))
        orchestrator(env, "migrate")
        if args.pg_stats:
            with create_engine(pg.url("cvgl"), isolation_level="AUTOCOMMIT").connect() as c:
                c.execute(text("CREATE EXTENSION pg_stat_statements"))
        orchestrator(env, "synth", str(work / "VIGOR"), "--queries", str(args.queries), "--image-size", "16")
        orchestrator(env, "ingest", str(work / "VIGOR"))
        orchestrator(env, "import-candidates", str(work / "VIGOR" / "candidates.csv"), "--name", "bench")
        procs.append(start([sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "prefork", "-c",
                            str(args.workers), "-Q", "vlm.simulated", "-n", "judge@%h", "--without-gossip",
                            "--without-mingle", "--loglevel", "INFO"], env, work / "judge.log"))
        # As `orchestrator coordinator` starts it: a solo pool for one process, prefork for more.
        pool = ["-P", "solo"] if args.coordinators == 1 else ["-P", "prefork", "-c", str(args.coordinators)]
        procs.append(start([sys.executable, "-m", "celery", "-A", "orchestrator.tasks", "worker", *pool,
                            "-Q", "coordination", "-n", "coord@%h", "--without-gossip",
                            "--without-mingle", "--loglevel", "INFO"], env, work / "coord.log"))
        from sqlalchemy import func, select

        from db.models import PairwiseVerdict, Run

        engine = create_engine(pg.url("cvgl"))
        rates, end_to_end = [], []  # run created -> finished (database clock); submit launched -> exited
        total_judgments = 0
        if args.pg_stats:
            with engine.connect() as c:
                c.execute(text("SELECT pg_stat_statements_reset()"))
                c.commit()
        groups = {"judgment workers": [procs[0].pid], "coordinator": [procs[1].pid]}
        for i in range(args.repeats):
            before = cpu_seconds({**groups, **service_pids(redis_srv.process.pid, pg.directory / "pg")})
            tasks_before = (tasks_done(work / "judge.log", JUDGE_PAIRWISE_TASK), tasks_done(work / "coord.log", ADVANCE_TASK))
            t0 = time.perf_counter()
            run_id = orchestrator(env, "submit", "--strategy", "pairwise", "--all-queries", "--seed", str(i),
                                  "--accuracy", "0.9", "--batch-size", str(args.batch_size), "--no-reuse",
                                  "--wait").split()[-1]
            elapsed = time.perf_counter() - t0
            with engine.connect() as c:
                n = c.scalar(select(func.count()).select_from(PairwiseVerdict)
                             .where(PairwiseVerdict.run_id == int(run_id)))
                created, finished = c.execute(select(Run.created_at, Run.finished_at)
                                              .where(Run.id == int(run_id))).one()
            ran = (finished - created).total_seconds()
            rates.append(n / ran)
            end_to_end.append(n / elapsed)
            total_judgments += n
            judge_tasks = tasks_done(work / "judge.log", JUDGE_PAIRWISE_TASK) - tasks_before[0]
            advance_tasks = tasks_done(work / "coord.log", ADVANCE_TASK) - tasks_before[1]
            after = cpu_seconds({**groups, **service_pids(redis_srv.process.pid, pg.directory / "pg")})
            used = {k: after[k] - before.get(k, 0.0) for k in after}
            share = ", ".join(f"{k} {v:.1f} s ({1e6 * v / n:.0f} us/judgment)" for k, v in used.items())
            print(f"run {run_id}: {n} judgments stored in {ran:.1f} s from run created to run finished = "
                  f"{n / ran:,.0f} judgments/s; {elapsed:.1f} s = {n / elapsed:,.0f}/s from launching "
                  "`orchestrator submit --wait` to its exit", flush=True)
            print(f"  CPU time: {share}; the orchestrator polls only", flush=True)
            print(f"  tasks: {judge_tasks} judgment tasks ({n / max(judge_tasks, 1):.0f} judgments each), "
                  f"{advance_tasks} coordinator advances", flush=True)
        if args.pg_stats:
            print_pg_stats(engine, total_judgments)
        engine.dispose()
        for p in procs:
            p.terminate()
            p.wait()
        procs.clear()
        raw1 = raw_celery_rate(env, work, 2000, 1)
        raw50 = raw_celery_rate(env, work, 400, 50)
        median = statistics.median(rates)
        print(f"\nwhole stack, {args.queries} queries x K=20 pairwise (merge sort), batch {args.batch_size}, "
              f"{args.workers} judgment + {args.coordinators} coordination worker processes on {os.cpu_count()} cores:")
        print(f"  median {median:,.0f} judgments stored/s over {args.repeats} runs ({', '.join(f'{r:,.0f}' for r in rates)}), "
              "run created to run finished")
        print(f"  median {statistics.median(end_to_end):,.0f} judgments/s from launching the submit command to its "
              f"exit (adds its Python start-up and its half-second wait poll)")
        print(f"  raw Celery no-op, late acks, prefetch 1: {raw1:,.0f} tasks/s at 1 item; {raw50:,.0f} items/s at 50 items")
        print(f"  ratio whole stack / raw Celery: {median / raw1:.1f}x the 1-item task rate, "
              f"{median / raw50:.2f}x the 50-item rate")
    finally:
        for p in procs:
            p.kill()
        redis_srv.stop()
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
