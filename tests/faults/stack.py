"""A whole stack of one's own for fault injection: PostgreSQL, Redis, Celery workers, the CLI.

Used by the scripted fault suite, the seeded fault schedule (``schedule.py``) and
``benchmarks/soak.py``. Every process is real; faults are signals, server stops and Redis commands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text

from db.migrate import upgrade_to_head
from tests.integration.conftest import REPO, CeleryWorker
from tests.services import PostgresServer, RedisServer, free_port


class Stack:
    def __init__(self, root: Path, appendonly: bool = False, **env: str):
        self.root = root
        self.redis = RedisServer(root / "redis", free_port()).start(appendonly=appendonly)
        self.pg = PostgresServer(None, free_port()).start()
        admin = create_engine(self.pg.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("CREATE DATABASE cvgl"))
        admin.dispose()
        self.url = self.pg.url("cvgl")
        upgrade_to_head(self.url)
        self.engine = create_engine(self.url, pool_pre_ping=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
        self.env.update(
            CVGL_DATABASE_URL=self.url,
            CVGL_BROKER_URL=self.redis.url,
            CVGL_HOME=str(root / "home"),
            CVGL_VISIBILITY_TIMEOUT="8",
            CVGL_UNACKED_RESTORE_INTERVAL="1",
            CVGL_SOFT_SHUTDOWN_TIMEOUT="2",
            # A lost message (Redis FLUSHALL) is re-sent once the run has not moved for this long.
            CVGL_STALL_SECONDS="2",
            PYTHONPATH=str(REPO),
            **env,
        )
        self.workers: list[CeleryWorker] = []
        self.processes: list[subprocess.Popen] = []

    def worker(self, queues: list[str], name: str, app: str) -> CeleryWorker:
        w = CeleryWorker(self.env, queues, name, app=app, log=self.root / f"{name}.log").start()
        self.workers.append(w)
        return w

    def cli(self, *args: str, **kw) -> subprocess.Popen:
        """``python -m orchestrator ARGS`` in the background; stopped at close."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            **kw,
        )
        self.processes.append(proc)
        return proc

    def scalar(self, stmt, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while True:  # PostgreSQL may be restarting
            try:
                with self.engine.connect() as c:
                    return c.scalar(stmt)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster and its backends: the next start runs crash recovery."""
        pid_file = Path(self.pg.directory) / "pg" / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for w in self.workers:
            w.stop()
        self.engine.dispose()
        self.redis.stop()
        self.pg.destroy()
