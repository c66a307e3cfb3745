"""The embedded default: SQLite and an in-process broker and worker, through the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGL_DATABASE_URL", f"sqlite:///{tmp_path / 'cvgl.sqlite3'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_demo_runs_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("demo", "--dir", "demo", "--queries", "30")
    assert result.exit_code == 0, result.output
    assert "baseline (stage 1)" in result.output
    assert "pairwise/pairwise" in result.output and "pointwise/yesno" in result.output
    db = sqlite3.connect(tmp_path / "demo" / "cvgl.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 2 * 30 * 20
    assert db.execute("SELECT COUNT(*) FROM pairwise_verdicts WHERE status != 'done'").fetchone()[0] == 0


def test_submit_runs_to_completion_in_process_and_reports_json(embedded):
    assert run("synth", "data", "--queries", "24", "--k", "10").exit_code == 0
    assert run("ingest", "data").exit_code == 0
    assert run("import-candidates", "data/candidates.csv", "--name", "c").exit_code == 0
    result = run("submit", "--strategy", "pairwise", "--k", "10", "--accuracy", "1.0")
    assert result.exit_code == 0, result.output
    run_id = int(result.stdout.split()[-1])
    status = run("status", str(run_id)).output
    assert "done" in status and "24/24" in status
    report = json.loads(run("report", "--format", "json").stdout)
    (base,), (row,) = report["baselines"], report["runs"]
    assert (row["run_id"], row["k"], row["n_queries"], base["k"]) == (run_id, 10, 24, 10)
    # A perfect judge puts every retrieved positive first.
    db = sqlite3.connect(embedded / "cvgl.sqlite3")
    in_top_k = db.execute(
        "SELECT COUNT(*) FROM run_query_ranks WHERE run_id = ? AND stage1_rank IS NOT NULL", (run_id,)
    ).fetchone()[0]
    assert row["recall"][0]["k"] == 1 and row["recall"][0]["value"] == pytest.approx(100.0 * in_top_k / 24)
    assert base["recall"][3]["k"] == 10 and base["recall"][3]["value"] == pytest.approx(100.0 * in_top_k / 24)


def _snapshot(path) -> dict[str, int]:
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    out["_runs"] = hash(tuple(db.execute("SELECT * FROM runs ORDER BY id").fetchall()))
    db.close()
    return out


@pytest.fixture(scope="module")
def stored_template(tmp_path_factory):
    """A database with a dataset, a candidate set and a finished run (built once, copied per test)."""
    root = tmp_path_factory.mktemp("stored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVGL_DATABASE_URL", f"sqlite:///{root / 'cvgl.sqlite3'}")
        mp.chdir(root)
        assert run("synth", "data", "--queries", "10", "--k", "5").exit_code == 0
        assert run("ingest", "data").exit_code == 0
        assert run("import-candidates", "data/candidates.csv", "--name", "c").exit_code == 0
        assert run("submit", "--k", "5", "--queries", "4").exit_code == 0
    return root


@pytest.fixture
def stored(embedded, stored_template):
    # Same absolute dataset root as at ingest, a private copy of the database.
    src, dst = sqlite3.connect(stored_template / "cvgl.sqlite3"), sqlite3.connect(embedded / "cvgl.sqlite3")
    src.backup(dst)  # WAL mode: a file copy could miss pages still in the -wal file
    src.close()
    dst.close()
    embedded_data = embedded / "data"
    embedded_data.symlink_to(stored_template / "data")
    return embedded


def _bad_candidates(root, kind: str) -> str:
    with (root / "data" / "candidates.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    first_query = rows[1][0]
    for row in rows[1:]:
        if kind == "query" and row[0] == first_query:
            row[0] = "nobody,1.0,2.0,.jpg"
    if kind == "tile":
        rows[1][1] = "satellite_0.0_0.0.png"
    path = root / f"bad_{kind}.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "missing-dir"], "does not exist"),
        (["submit", "--strategy", "quicksort"], "Unknown strategy 'quicksort'."),
        (["submit", "--strategy", "pairwse"], "Unknown strategy 'pairwse'. Did you mean 'pairwise'?"),
        (["submit", "--prompt", "haiku"], "Unknown prompt 'haiku'."),
        (["submit", "--prompt", "likrt"], "Unknown prompt 'likrt'. Did you mean 'likert'?"),
        (["submit", "--judge", "simulatd"], "Unknown judge 'simulatd'. Did you mean 'simulated'?"),
        (["submit", "--candidates", "nope"], "no candidate set named 'nope'"),
        (["submit", "--strategy", "pointwise", "--prompt", "pairwise"], "strategy 'pointwise' needs a pointwise prompt"),
        (["submit", "--k", "50"], "--k 50 exceeds the 5 candidates"),
        (["status", "999"], "run 999 does not exist"),
        (["resume", "999"], "run 999 does not exist"),
        (["report", "1", "999"], "no run with id 999"),
        (["import-candidates", "no-such.csv", "--name", "x"], "does not exist"),
        (["import-candidates", "BAD:query", "--name", "x"], "1 unknown queries"),
        (["import-candidates", "BAD:tile", "--name", "x"], "1 unknown tiles"),
        (["import-candidates", "data/candidates.csv", "--name", "c", "--dataset", "elsewhere"], "not ingested"),
    ],
)
def test_bad_input_is_a_one_line_error_and_changes_nothing(stored, args, message):
    args = [_bad_candidates(stored, a.split(":")[1]) if a.startswith("BAD:") else a for a in args]
    before = _snapshot(stored / "cvgl.sqlite3")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output  # one line, not a usage block (exit 2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert _snapshot(stored / "cvgl.sqlite3") == before


def test_malformed_label_line_names_file_and_line(stored):
    template = (stored / "data").resolve()
    (stored / "data").unlink()
    shutil.copytree(template, stored / "data")
    labels = stored / "data" / "splits" / "SanFrancisco" / "pano_label_balanced.txt"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2] + " extra"
    labels.write_text("\n".join(lines) + "\n")
    before = _snapshot(stored / "cvgl.sqlite3")
    result = CliRunner().invoke(cli, ["ingest", "data"])
    assert result.exit_code == 1
    assert "data/splits/SanFrancisco/pano_label_balanced.txt:3: expected 13 space-separated fields, got 14" in result.output
    assert _snapshot(stored / "cvgl.sqlite3") == before


def test_reimporting_the_same_candidates_changes_nothing(stored):
    before = _snapshot(stored / "cvgl.sqlite3")
    result = run("import-candidates", "data/candidates.csv", "--name", "c")
    assert result.exit_code == 0 and "already stored" in result.output
    assert _snapshot(stored / "cvgl.sqlite3") == before
    assert os.path.exists(stored / "cvgl.sqlite3")


def test_ingest_of_another_citys_dataset_names_the_cities_to_pass(embedded):
    assert run("synth", "one", "--queries", "8", "--cities", "Chicago").exit_code == 0
    result = run("ingest", "one")
    assert result.exit_code == 1
    assert "this dataset has Chicago: pass --cities Chicago" in result.output
    assert run("ingest", "one", "--cities", "Chicago").exit_code == 0


def test_submit_with_the_broker_or_database_down_is_one_line_and_stores_nothing(stored, monkeypatch):
    before = _snapshot(stored / "cvgl.sqlite3")
    monkeypatch.setenv("CVGL_BROKER_URL", "redis://:secret@127.0.0.1:1/0")  # nothing listens on port 1
    result = CliRunner().invoke(cli, ["submit"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot reach the broker at redis://***@127.0.0.1:1/0" in result.output
    assert "secret" not in result.output and "Traceback" not in result.output
    assert _snapshot(stored / "cvgl.sqlite3") == before  # no run was created
    monkeypatch.delenv("CVGL_BROKER_URL")
    monkeypatch.setenv("CVGL_DATABASE_URL", "postgresql+psycopg://me:secret@127.0.0.1:1/cvgl")
    result = CliRunner().invoke(cli, ["submit"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "database error at postgresql+psycopg://***@127.0.0.1:1/cvgl: connection failed" in result.output
    assert "secret" not in result.output
