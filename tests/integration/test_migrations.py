"""The schema exists only through Alembic: both backends migrate up and down, with no drift."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from db.engine import get_engine
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


def test_postgresql_migrates_to_head_without_drift_and_back(pg_fresh_url):
    _assert_no_drift(pg_fresh_url)  # the fixture migrated it from nothing
    _down_and_up(pg_fresh_url)
    _assert_no_drift(pg_fresh_url)
    engine = create_engine(pg_fresh_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
    engine.dispose()


def _populate_at_0003_and_upgrade(url: str) -> list[int]:
    cfg = alembic_config()
    engine = get_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO datasets (id, root, name, created_at) VALUES (1, '/d', 'd', '2026-01-01')")
        conn.exec_driver_sql(
            "INSERT INTO tiles (id, dataset_id, city, name, path, lat, lon) VALUES (1, 1, 'X', 't', 't', 0, 0)"
        )
        conn.exec_driver_sql(
            "INSERT INTO tiles (id, dataset_id, city, name, path, lat, lon) VALUES (2, 1, 'X', 'u', 'u', 0, 0)"
        )
        conn.exec_driver_sql(
            "INSERT INTO queries (id, dataset_id, city, name, panoid, path, lat, lon)"
            " VALUES (1, 1, 'X', 'q', 'p', 'q', 0, 0)"
        )
        conn.exec_driver_sql(
            "INSERT INTO candidate_sets (id, name, dataset_id, k, source, details, created_at)"
            " VALUES (1, 'c', 1, 1, 'import', '{}', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO runs (id, candidate_set_id, strategy, prompt_name, prompt_sha256, judge, model,"
            " model_revision, queue, seed, k, n_queries, batch_size, max_attempts, params, status, created_at)"
            " VALUES (1, 1, 'pairwise', 'pairwise', 'x', 'simulated', 's', 'v', 'q', 0, 1, 1, 1, 1, '{}',"
            " 'done', '2026-01-01')"
        )
        conn.exec_driver_sql("INSERT INTO run_queries (run_id, query_id, done_at) VALUES (1, 1, '2026-01-01')")
        conn.exec_driver_sql("INSERT INTO rankings (run_id, query_id, rank, tile_id) VALUES (1, 1, 1, 1)")
        conn.exec_driver_sql(
            "INSERT INTO pairwise_verdicts (id, run_id, query_id, tile_first, tile_second, status, attempts,"
            " created_at) VALUES (1, 1, 1, 1, 2, 'pending', 0, '2026-01-01')"
        )
    upgrade_to_head(url)
    tables = ("runs", "run_queries", "rankings", "pairwise_verdicts")
    with engine.connect() as conn:
        counts = [conn.exec_driver_sql(f"SELECT COUNT(*) FROM {t}").scalar() for t in tables]
        # 0008: the task id column is there, empty on existing rows (such a row is stale, as it should be).
        assert conn.exec_driver_sql("SELECT task_id FROM pairwise_verdicts").scalar() is None
    engine.dispose()
    return counts


def test_sqlite_keeps_every_row_when_migrating_a_populated_database(tmp_path):
    # SQLite rebuilds a table to alter it, and dropping the old copy fires ON DELETE CASCADE in
    # its children: a migration that rebuilt ``runs`` once emptied run_queries and rankings.
    assert _populate_at_0003_and_upgrade(f"sqlite:///{tmp_path / 'm.sqlite3'}") == [1, 1, 1, 1]


def test_postgresql_keeps_every_row_when_migrating_a_populated_database(pg_url):
    cfg = alembic_config()
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    engine.dispose()
    assert _populate_at_0003_and_upgrade(pg_url) == [1, 1, 1, 1]
