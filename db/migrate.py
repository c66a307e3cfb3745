"""Programmatic Alembic: bring a database to the newest schema (CLI, workers, test fixtures)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.engine import get_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config() -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}; install the project with `pip install -e .`"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade_to_head(url: str | None = None) -> None:
    """Apply every pending migration to the database at ``url`` (default: database_url())."""
    cfg = alembic_config()
    engine = get_engine(url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # a migration may rewrite a large table: no time limit
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_revision(url: str | None = None) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def is_up_to_date(url: str | None = None) -> bool:
    return current_revision(normalize_url(url) if url else None) == head_revision()
