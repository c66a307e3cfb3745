"""``orchestrator calibrate`` and ``submit --then-calibrate`` end to end on the embedded default."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.chdir(tmp_path)
    for args in (["synth", "data", "--queries", "60", "--k", "10"], ["ingest", "data"],
                 ["import-candidates", "data/candidates.csv", "--name", "c"]):  # fmt: skip
        assert run(*args).exit_code == 0
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _rows(db: sqlite3.Connection, sql: str, *params) -> list[tuple]:
    return db.execute(sql, params).fetchall()


def _parent_rows(db: sqlite3.Connection, run_id: int) -> tuple:
    return (
        _rows(db, "SELECT * FROM runs WHERE id = ?", run_id),
        _rows(db, "SELECT * FROM run_queries WHERE run_id = ? ORDER BY query_id", run_id),
        _rows(db, "SELECT * FROM rankings WHERE run_id = ? ORDER BY query_id, rank", run_id),
        _rows(
            db,
            "SELECT id, status, first_wins, p_first FROM pairwise_verdicts WHERE run_id = ? ORDER BY id",
            run_id,
        ),
    )


def test_calibrate_derives_a_run_on_the_test_queries_only_and_reproducibly(embedded):
    assert run("submit", "--accuracy", "0.95", "--queries", "60", "--k", "10").exit_code == 0
    db = sqlite3.connect(embedded / "cvgl.sqlite3")
    before = _parent_rows(db, 1)

    out = run("calibrate", "1", "--method", "fuse", "--seed", "3")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("run 2: fuse of run 1, weight ") and "fitted on 18 dev queries" in out.output
    assert "Q1 = 42 queries" in out.output  # the parent and the derived run on the test queries

    dev = {q for (q,) in _rows(db, "SELECT query_id FROM fit_queries WHERE run_id = 2")}
    test = {
        q for (q,) in _rows(db, "SELECT query_id FROM run_queries WHERE run_id = 2 AND done_at IS NOT NULL")
    }
    parent = {q for (q,) in _rows(db, "SELECT query_id FROM run_queries WHERE run_id = 1")}
    assert len(dev) == 18 and len(test) == 42 and dev.isdisjoint(test) and dev | test == parent
    ranked = {q for (q,) in _rows(db, "SELECT DISTINCT query_id FROM rankings WHERE run_id = 2")}
    assert ranked == test  # never a ranking, so never an evaluation, on a query it was fitted on
    assert _rows(db, "SELECT parent_run_id, method FROM derived_runs WHERE run_id = 2") == [(1, "fuse")]
    assert _parent_rows(db, 1) == before  # the parent is read, not changed

    report = json.loads(run("report", "2", "--format", "json").stdout)
    (row,) = report["runs"]
    assert row["n_queries"] == 42 and row["strategy"] == "fuse"
    assert row["strategy_options"]["parent"] == 1 and row["strategy_options"]["dev_queries"] == 18

    # The same seed gives the same rows; another seed another split.
    assert run("calibrate", "1", "--method", "fuse", "--seed", "3").exit_code == 0
    same = "SELECT query_id, rank, tile_id FROM rankings WHERE run_id = ? ORDER BY query_id, rank"
    assert _rows(db, same, 3) == _rows(db, same, 2)
    params = "SELECT params, strategy, k, n_queries FROM runs WHERE id = ?"
    assert _rows(db, params, 3) == _rows(db, params, 2)
    assert run("calibrate", "1", "--method", "gate", "--seed", "4").exit_code == 0
    other = {q for (q,) in _rows(db, "SELECT query_id FROM fit_queries WHERE run_id = 4")}
    assert other != dev


def test_calibrate_refuses_bad_input_in_one_line_and_stores_nothing(embedded):
    assert run("submit", "--accuracy", "0.95", "--queries", "60", "--k", "10").exit_code == 0
    assert run("submit", "--accuracy", "0.95", "--queries", "12", "--k", "10", "--seed", "1").exit_code == 0
    assert run("calibrate", "1", "--method", "gate").exit_code == 0  # run 3, derived
    db = sqlite3.connect(embedded / "cvgl.sqlite3")
    db.execute("UPDATE runs SET status = 'running' WHERE id = 2")  # as if still going
    db.commit()
    counts = "SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM rankings), (SELECT COUNT(*) FROM fit_queries)"
    before = _rows(db, counts)
    for args, message in (
        (["calibrate", "1", "--method", "fsue"], "unknown method 'fsue'. Did you mean 'fuse'?"),
        (["calibrate", "2", "--method", "fuse"], "run 2 is not finished (status running)"),
        (["calibrate", "9", "--method", "fuse"], "no run with id 9"),
        (["calibrate", "3", "--method", "fuse"], "run 3 is itself derived (from run 1)"),
        (["calibrate", "1", "--method", "fuse", "--dev-share", "0.95"], "at least 100 finished queries"),
        (["submit", "--queries", "10", "--then-calibrate", "gaet"], "Did you mean 'gate'?"),
    ):
        out = run(*args)
        assert out.exit_code == 1, (args, out.output)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.output
    assert _rows(db, counts) == before


def test_submit_then_calibrate_runs_the_parent_and_derives(embedded):
    out = run("submit", "--accuracy", "0.3", "--queries", "60", "--k", "10", "--then-calibrate", "fuse")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0] == "1" and lines[1].startswith("run 2: fuse of run 1, weight 0.0")  # a harmful judge: off
