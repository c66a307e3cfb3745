"""Database URL, engine and session factory.

The database URL comes from the settings (``CVGL_DATABASE_URL`` or ``--database-url``). Unset means
the embedded default: a SQLite file (``CVGL_HOME``/cvgl.sqlite3, by default
``~/.local/share/cvgl-rerank``). Imports only ``db.settings`` of ours.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from db.settings import settings

DATABASE_URL_ENV = "CVGL_DATABASE_URL"


def cvgl_home() -> Path:
    """Folder for embedded-mode state (SQLite file), from ``CVGL_HOME`` or the XDG data dir."""
    home = settings().home
    if home:
        return home
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cvgl-rerank"


def database_url() -> str:
    """The database URL: ``CVGL_DATABASE_URL`` or a SQLite file in :func:`cvgl_home`."""
    url = settings().database_url
    if not url:
        return f"sqlite:///{cvgl_home() / 'cvgl.sqlite3'}"
    return normalize_url(url)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str | None = None) -> Engine:
    """Create an engine with the settings each backend needs for several writer processes."""
    url = normalize_url(url or database_url())
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # The embedded worker thread and the coordinator write concurrently; pysqlite's
        # default 5 s lock wait is too short under load, and WAL lets readers proceed.
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every SQLite test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # pool_pre_ping: a PostgreSQL restart leaves dead pooled connections behind.
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=pg_session_limits()
    )


# No session may hold locks for long: a worker frozen (SIGSTOP, a hung GPU) inside a transaction
# would stall every other worker behind its row locks. The server ends such a session, a blocked
# statement gives up, and a dead peer is noticed; the errors are retried like a connection error.
PG_LIMITS = {  # PostgreSQL setting -> field of db.settings.Settings (seconds)
    "lock_timeout": "db_lock_timeout",
    "idle_in_transaction_session_timeout": "db_idle_in_transaction_timeout",
    "statement_timeout": "db_statement_timeout",
}


def pg_session_limits() -> dict[str, object]:
    """libpq connection arguments: the session timeouts above and TCP keepalives."""
    options = []
    current = settings()
    for setting, name in PG_LIMITS.items():
        seconds = getattr(current, name)
        options.append(f"-c {setting}={int(seconds * 1000)}")
    return {
        "options": " ".join(options),
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """A process-wide engine per URL (see :func:`dispose_engines` for forked children)."""
    url = normalize_url(url or database_url())
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = make_engine(url)
    return engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def dispose_engines() -> None:
    """Drop pooled connections inherited through fork, without closing the parent's sockets."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)


def database_of(session: Session) -> str:
    """Which database a session talks to, for keying per-process caches of its rows (a process,
    a test run for one, may talk to several databases whose ids overlap)."""
    return session.get_bind().url.render_as_string(hide_password=True)


def hide_password(url: str) -> str:
    """The URL with its credentials replaced by ``***``: safe to print."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
