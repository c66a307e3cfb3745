"""Hostile and broken input, through the CLI and the task queue: each gets a clear error or a
recorded failure, and nothing already stored changes."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import create_engine, inspect, select, text, update

from db.models import PointwiseScore, Tile
from tests.integration.conftest import cli

pytestmark = pytest.mark.integration


def snapshot(engine) -> dict[str, str]:
    """A digest of every table's rows: equal snapshots mean nothing stored changed."""
    out = {}
    with engine.connect() as c:
        for table in sorted(inspect(c).get_table_names()):
            out[table] = c.execute(text(f'SELECT md5(coalesce(string_agg(t::text, \'|\' ORDER BY t::text), \'\')) FROM "{table}" t')).scalar()
    return out


def _write_candidates(path: Path, rows: list[list[str]]) -> str:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["query", "tile", "rank", "score"], *rows])
    return str(path)


def test_hostile_cli_input_is_refused_and_changes_nothing(stack_env, dataset, pg_url, tmp_path):
    cli(stack_env, "ingest", str(dataset))
    cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    some_query = next(csv.reader((dataset / "candidates.csv").open()))  # header
    rows = list(csv.reader((dataset / "candidates.csv").open()))[1:21]  # the first query's 20 candidates
    first = rows[0]
    truncated = tmp_path / "truncated"
    shutil.copytree(dataset, truncated)
    labels = truncated / "splits" / "Chicago" / "pano_label_balanced.txt"
    labels.write_text(labels.read_text()[: len(labels.read_text()) // 2])  # cut mid-line
    wrong_family = tmp_path / "bert-model"
    wrong_family.mkdir()
    (wrong_family / "config.json").write_text(json.dumps({"model_type": "bert"}))
    table = [
        (["ingest", str(tmp_path / "no-such-root")], "does not exist"),
        (["ingest", str(truncated)], "expected 13 space-separated fields"),
        (["import-candidates", _write_candidates(tmp_path / "unknown.csv",
                                                 rows + [["nobody,1,2,.jpg", row[1], row[2], row[3]] for row in rows]),
          "--name", "x"], "1 unknown queries (e.g. ['nobody,1,2,.jpg'])"),
        (["import-candidates", _write_candidates(tmp_path / "escape.csv",
                                                 [[first[0], f"../../../../etc/passwd{r}", str(r), "0.5"] for r in range(1, 21)]),
          "--name", "y"], "unknown tiles"),
        (["report", "1 OR 1=1"], "is not a valid integer"),
        (["status", "1; DELETE FROM runs"], "is neither a run id nor an adapter name"),
        (["resume", "1; DELETE FROM runs"], "is neither a run id nor an adapter name"),
        (["submit", "--candidates", "x'; DROP TABLE runs; --"], "no candidate set named"),
        (["submit", "--judge", "llava", "--model", "/no/such/folder"], "does not exist"),
        (["submit", "--judge", "llava", "--model", str(wrong_family)], "'bert' checkpoint, not LLaVA"),
        (["submit", "--judge", "gpt-9"], "Unknown judge 'gpt-9'"),
    ]
    assert some_query == ["query", "tile", "rank", "score"]
    before = snapshot(engine)
    for args, message in table:
        proc = cli(stack_env, *args, check=False)
        assert proc.returncode in (1, 2), (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert snapshot(engine) == before, f"{args} changed what was stored"
    engine.dispose()


def test_broken_images_and_messages_are_recorded_or_rejected(stack_env, dataset, pg_url, workers, tmp_path):
    data = tmp_path / "VIGOR"
    shutil.copytree(dataset, data)
    cli(stack_env, "ingest", str(data))
    cli(stack_env, "import-candidates", str(data / "candidates.csv"), "--name", "s4g")
    engine = create_engine(pg_url)
    stage1 = list(csv.DictReader((data / "candidates.csv").open()))
    missing_tile, corrupt_query, escaping_tile = stage1[0]["tile"], stage1[40]["query"], stage1[41]["tile"]
    missing_path = next(data.glob(f"*/satellite/{missing_tile}"))
    missing_path.unlink()
    next(data.glob(f"*/panorama/{corrupt_query}")).write_bytes(b"\xff\xd8 not really a jpeg")
    with engine.begin() as c:  # a path that escapes the dataset root, as a tampered row would hold
        c.execute(update(Tile).where(Tile.name == escaping_tile).values(path="../../../../etc/passwd"))
    judge_worker = workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    workers(["coordination"], "coordinator")

    # Messages an attacker or a buggy producer could put on the queue.
    producer = Celery("attacker", broker=stack_env["CVGL_BROKER_URL"])
    before = snapshot(engine)
    producer.send_task("cvgl.judge_pairwise", args=["1 OR 1=1"], queue="vlm.simulated")
    producer.send_task("cvgl.judge_pairwise", args=[[-5, "x"]], queue="vlm.simulated")
    producer.send_task("cvgl.judge_pointwise", args=[], kwargs={"ids": {"$gt": 0}}, queue="vlm.simulated")
    producer.send_task("cvgl.judge_pairwise", args=[[1, 2, 3]], queue="vlm.simulated", serializer="pickle")
    log = judge_worker.log
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text_ = log.read_text()
        if text_.count("malformed judgment task payload") >= 3 and "untrusted content" in text_:
            break
        time.sleep(0.2)
    text_ = log.read_text()
    assert text_.count("malformed judgment task payload") >= 3, text_[-3000:]
    assert "Refusing to deserialize untrusted content of type pickle" in text_, text_[-3000:]
    assert judge_worker.process.poll() is None
    assert snapshot(engine) == before

    # A run over the broken files completes; each bad file fails its own judgments, by name.
    run_id = int(cli(stack_env, "submit", "--strategy", "pointwise", "--all-queries", "--wait").stdout.split()[-1])
    with engine.connect() as c:
        rows = c.execute(select(PointwiseScore.status, PointwiseScore.error).where(PointwiseScore.run_id == run_id)).all()
        status = c.execute(text("SELECT status FROM runs WHERE id = :r"), {"r": run_id}).scalar()
    engine.dispose()
    assert status == "done"
    errors = [e for s, e in rows if s == "failed"]
    assert any(f"missing: {missing_path}" in e for e in errors)
    assert any("corrupt:" in e and corrupt_query in e for e in errors)
    assert any("leaves the dataset root" in e for e in errors)
    assert sum(s == "done" for s, _ in rows) > len(rows) - 60
