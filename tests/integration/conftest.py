"""Real services for integration tests: PostgreSQL, Redis and Celery worker processes.

``CVGL_TEST_DATABASE_URL`` (a server where databases can be created) and ``CVGL_TEST_REDIS_URL``
select running servers (``.ci/run`` starts them); otherwise the session starts its own on free
loopback ports. Every test gets a fresh migrated database (a copy of one migrated once per
session) and an empty Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis
from sqlalchemy import create_engine, text

from db.migrate import upgrade_to_head
from tests.builders import synthetic_dataset
from tests.services import PostgresServer, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer | None]:
    if os.environ.get("CVGL_TEST_REDIS_URL"):
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    if redis_server is not None:
        return redis_server.url
    return _own_database(os.environ["CVGL_TEST_REDIS_URL"])


def _own_database(url: str) -> str:
    """Under pytest-xdist, a shared Redis gives each test process its own database number, so one
    process's ``flushdb`` never empties another's queues (kombu prefixes fanout channels with it too)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return url
    number = int(worker.removeprefix("gw")) + 1
    base, _, last = url.rstrip("/").rpartition("/")
    return f"{base}/{number}" if last.isdigit() and "//" in base else f"{url.rstrip('/')}/{number}"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory) -> Iterator[PostgresServer | None]:
    if os.environ.get("CVGL_TEST_DATABASE_URL"):
        yield None
        return
    server = PostgresServer(None, free_port()).start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_admin_url(pg_server) -> str:
    url = os.environ.get("CVGL_TEST_DATABASE_URL") or pg_server.admin_url
    return (
        url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
    )


def _create_database(admin_url: str, template: str | None = None) -> tuple[str, str]:
    name = f"cvgl_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    admin.dispose()
    return name, admin_url.rsplit("/", 1)[0] + "/" + name


def _drop_database(admin_url: str, name: str, url: str) -> None:
    from db.engine import _ENGINES

    engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url) -> Iterator[str]:
    """A database migrated once per session, copied for each test (a copy takes a fraction of
    the time of a full Alembic run)."""
    from db.engine import _ENGINES

    name, url = _create_database(pg_admin_url)
    upgrade_to_head(url)
    _ENGINES.pop(url).dispose()  # PostgreSQL copies a template only while nobody is connected to it
    yield name
    _drop_database(pg_admin_url, name, url)


@pytest.fixture
def pg_url(pg_admin_url, pg_template) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own: a copy of the session's template."""
    name, url = _create_database(pg_admin_url, template=pg_template)
    yield url
    _drop_database(pg_admin_url, name, url)


@pytest.fixture
def pg_fresh_url(pg_admin_url) -> Iterator[str]:
    """A fresh PostgreSQL database migrated from nothing, for the tests of the migrations themselves."""
    name, url = _create_database(pg_admin_url)
    upgrade_to_head(url)
    yield url
    _drop_database(pg_admin_url, name, url)


@pytest.fixture
def clean_redis(redis_url) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("vigor") / "VIGOR", n_queries=40)


@pytest.fixture
def stack_env(pg_url, clean_redis, tmp_path) -> dict[str, str]:
    """Environment for CLI and worker subprocesses on this test's database and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
    env.update(
        CVGL_DATABASE_URL=pg_url,
        CVGL_BROKER_URL=clean_redis,
        CVGL_HOME=str(tmp_path / "home"),
        # Short redelivery so killed work comes back within the test (queue-and-db.md §12).
        CVGL_VISIBILITY_TIMEOUT="8",
        CVGL_UNACKED_RESTORE_INTERVAL="1",
        CVGL_SOFT_SHUTDOWN_TIMEOUT="2",
        CVGL_STALL_SECONDS="15",
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
    )
    return env


# Commands that neither send work to the broker nor wait for it. When a test expects one to
# succeed it runs in this process: a Python start-up (about a second on two busy cores) less each.
# Without a broker every command runs in the CLI's own process anyway (the embedded worker).
IN_PROCESS = frozenset({"synth", "ingest", "import-candidates", "status", "report", "figures", "migrate"})


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned); TimeoutError(what) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(what)


def cli(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m orchestrator ARGS`` as a user would.

    A call expected to succeed (``check``) of a command in ``IN_PROCESS``, or of any command in
    the embedded mode (no ``CVGL_BROKER_URL``), runs through click in this process with ``env``'s
    settings; every other call, and every call whose failure is the point (its exit code and
    stderr as a user sees them), runs in a process of its own.
    """
    if check and args and (args[0] in IN_PROCESS or not env.get("CVGL_BROKER_URL")):
        return _cli_in_process(env, args)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _cli_in_process(env: dict[str, str], args: tuple[str, ...]) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from db.engine import _ENGINES
    from orchestrator.cli import cli as orchestrator_cli

    # The settings are read from the environment: exactly env's CVGL_* for the call, no others.
    settings: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CVGL_")}
    settings.update({k: v for k, v in env.items() if k.startswith("CVGL_")})
    engines = set(_ENGINES)
    try:
        result = CliRunner().invoke(orchestrator_cli, list(args), env=settings, catch_exceptions=False)
    finally:
        for url in set(_ENGINES) - engines:  # as a process's would, its connections end with it
            _ENGINES.pop(url).dispose()
    if result.exit_code != 0:
        raise AssertionError(f"orchestrator {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return subprocess.CompletedProcess(["orchestrator", *args], result.exit_code, result.stdout, result.stderr)


@dataclass
class CeleryWorker:
    """A real ``celery worker`` process (prefork, one child), as users start it."""

    env: dict[str, str]
    queues: list[str]
    name: str
    app: str = "orchestrator.tasks"
    log: Path | None = None
    process: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> CeleryWorker:
        assert self.log is not None
        self._fh = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                self.app,
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
                "-Q",
                ",".join(self.queues),
                "-n",
                f"{self.name}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                *self.extra,
            ],
            env=self.env,
            cwd=REPO,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"ready." in self.log.read_bytes():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[psutil.Process]:
        assert self.process is not None
        return psutil.Process(self.process.pid).children()

    def kill_child(self) -> int:
        """SIGKILL the pool child (what an OOM kill or a segfault does)."""
        (child,) = self.children()
        os.kill(child.pid, signal.SIGKILL)
        return child.pid

    def kill(self) -> None:
        """SIGKILL the whole worker, parent and child."""
        if self.process is None:
            return
        for c in self.children():
            c.kill()
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM) without waiting for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None
        self._fh.close()


@pytest.fixture
def workers(stack_env, tmp_path) -> Iterator[callable]:
    """Factory for worker processes; all are stopped at the end of the test."""
    started: list[CeleryWorker] = []

    def start(queues: list[str], name: str, **kw) -> CeleryWorker:
        w = CeleryWorker(stack_env, queues, name, log=tmp_path / f"{name}.log", **kw).start()
        started.append(w)
        return w

    yield start
    for w in started:  # all at once: each warm shutdown takes a second or two
        w.terminate()
    for w in started:
        w.wait_stopped()
