"""The schema exists only through Alembic: both backends migrate up and down, with no drift."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from db.migrate import alembic_config, head_revision, upgrade_to_head
from db.models import Base

pytestmark = pytest.mark.integration


def _assert_no_drift(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        views = set(inspect(conn).get_view_names())
    engine.dispose()
    assert {"positive_ranks", "run_query_ranks", "run_recall", "candidate_set_recall"} <= views


def _down_and_up(url: str) -> None:
    cfg = alembic_config()
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade_to_head(url)


def test_sqlite_migrates_to_head_without_drift_and_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade_to_head(url)
    _assert_no_drift(url)
    _down_and_up(url)
    _assert_no_drift(url)


def test_postgresql_migrates_to_head_without_drift_and_back(pg_url):
    _assert_no_drift(pg_url)  # the fixture already upgraded it
    _down_and_up(pg_url)
    _assert_no_drift(pg_url)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
    engine.dispose()
