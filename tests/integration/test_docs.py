"""Every ``bash`` and ``sql`` block of README.md and docs/*.md, run as written.

Shell: each file's ``bash`` blocks run in order, each with ``bash -euo pipefail``, in one temporary
folder that stands for a checkout: its ``.venv`` is this interpreter's environment, so
``. .venv/bin/activate``, ``orchestrator`` and ``celery`` resolve as they do for a user, on this
checkout's code (PYTHONPATH). Without CVGL_* settings the blocks run on the embedded default in that
folder. A block marked just above with ``<!-- docs-test: services -->`` runs with CVGL_DATABASE_URL
and CVGL_BROKER_URL on this test's PostgreSQL and Redis, with a simulated-judge worker and the
coordinator running; ``<!-- docs-test: skip (reason) -->`` is not run (long-running services,
installs) and must say why.

SQL: every block of docs/sql.md, on SQLite and on PostgreSQL, over a small real experiment run in
this process through the CLI (embedded mode: no broker; the same code on either database). Each
block is sent to the database as written; its numbers are checked against ``orchestrator report
--format json`` where the report has them, and against counts from plain SELECTs where it has not.
A block that only one of the two databases accepts fails here. The SQL of the other pages runs too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select

from db.models import Candidate, GroundTruth, PairwiseVerdict, PointwiseScore, Query, Ranking, Run, RunQuery
from orchestrator.cli import cli as orchestrator_cli
from tests.doc_blocks import Block, blocks, doc_files, stray_marks
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "sql.md"
KS = (1, 3, 5, 10)
N_BLOCKS = 9  # a new block needs its check below


def sql_blocks(path: Path = DOC) -> list[str]:
    return [b.text for b in blocks(path) if b.lang == "sql"]


def other_docs_sql() -> list[str]:
    """SQL the README and the other docs show outside docs/sql.md (now: the retrieval view)."""
    return [sql for p in doc_files() if p != DOC for sql in sql_blocks(p)]


# -- shell blocks


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "bash"]


SHELL_DOCS = [p for p in doc_files() if any(b.mark != "skip" for b in shell_blocks(p))]


def test_marks_are_known_and_skips_say_why():
    for path in doc_files():
        assert not stray_marks(path), f"a docs-test mark not right above a block: {stray_marks(path)}"
        for b in blocks(path):
            if b.mark is None:
                continue
            assert b.lang == "bash", f"{b.where}: only bash blocks are run, so only they take a mark"
            assert b.mark in ("skip", "services"), f"{b.where}: unknown mark {b.mark!r}"
            if b.mark == "skip":
                assert b.reason and len(b.reason.split()) >= 2, f"{b.where}: a skip says why"
    # The services walkthrough and the demo are among the blocks that run.
    running = [b for p in SHELL_DOCS for b in shell_blocks(p) if b.mark != "skip"]
    assert any(b.mark == "services" for b in running)
    assert any(re.search(r"^orchestrator demo\b", b.text, flags=re.M) for b in running)


def _checkout(folder: Path) -> None:
    """Make FOLDER look like a checkout with its environment in .venv: this interpreter's."""
    venv = folder / ".venv"
    if sys.prefix != sys.base_prefix:
        venv.symlink_to(sys.prefix)
    else:  # no virtual environment: an activate script that puts this interpreter first
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')


def _block_env(base: dict[str, str], folder: Path) -> dict[str, str]:
    env = dict(base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)  # this checkout's code, whatever the environment has installed
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("CVGL_HOME", str(folder / "cvgl-home"))
    return env


@pytest.mark.parametrize("path", SHELL_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_blocks_run_as_written(path, tmp_path, request):
    folder = tmp_path / "checkout"
    folder.mkdir()
    _checkout(folder)
    plain = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
    services = None
    for block in shell_blocks(path):
        if block.mark == "skip":
            continue
        if block.mark == "services":
            if services is None:
                start = request.getfixturevalue("workers")
                start(["coordination"], "coordinator")
                start(["vlm.simulated"], "vlm-simulated", app="workers.app")
                services = request.getfixturevalue("stack_env")
            env = _block_env(services, folder)
        else:
            env = _block_env(plain, folder)
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.text],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (
            f"{block.where} exited {proc.returncode}:\n{block.text}"
            f"--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
        )


# -- sql blocks


def test_every_block_is_one_portable_statement_without_hard_coded_ids():
    blocks = sql_blocks()
    assert len(blocks) == N_BLOCKS, (
        "docs/sql.md changed: check the new block in test_sql_docs_on_both_databases"
    )
    for sql in blocks + other_docs_sql():
        assert ";" not in sql.strip().rstrip(";"), f"one statement per block:\n{sql}"
        assert not re.search(r"^\s*\\", sql, flags=re.M), f"psql meta-command:\n{sql}"
        assert "::" not in sql, f"PostgreSQL-only cast:\n{sql}"
        assert not re.search(r"(?<![\w:]):\w", sql), f"bind parameter:\n{sql}"
        assert not re.search(r"\b(id|\w+_id)\s*(=|<>|!=|<=?|>=?|IN\s*\()\s*\d", sql, flags=re.I), (
            f"hard-coded id:\n{sql}"
        )


# -- the experiment


def orchestrator(url: str, *args: str) -> str:
    result = CliRunner().invoke(
        orchestrator_cli, list(args), env={"CVGL_DATABASE_URL": url}, catch_exceptions=False
    )
    assert result.exit_code == 0, f"orchestrator {' '.join(args)}:\n{result.output}"
    return result.stdout


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Iterator[str]:
    """A fresh database of either kind; the CLI migrates SQLite itself."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_url")
        return
    url = f"sqlite:///{tmp_path / 'cvgl.sqlite3'}"
    yield url
    from db.engine import _ENGINES

    engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


RUNS = (  # two pairwise runs on different samples, one with position bias; pointwise; pairwise at K=5
    ("--accuracy", "0.9", "--queries", "20", "--seed", "0", "--k", "10"),
    ("--accuracy", "0.7", "--position-bias", "0.3", "--queries", "20", "--seed", "1", "--k", "10"),
    ("--strategy", "pointwise", "--accuracy", "0.8", "--queries", "15", "--seed", "2", "--k", "10"),
    ("--accuracy", "0.8", "--queries", "20", "--seed", "3", "--k", "5"),
)


def _experiment(url: str, tmp_path) -> list[int]:
    data = tmp_path / "data"
    orchestrator(url, "synth", str(data), "--queries", "30", "--k", "10")
    orchestrator(url, "ingest", str(data))
    orchestrator(url, "import-candidates", str(data / "candidates.csv"), "--name", "s4g")
    return [int(orchestrator(url, "submit", *args).split()[-1]) for args in RUNS]


def _stored(url: str) -> dict[str, Any]:
    """What the independent checks need, read with plain SELECTs."""
    engine = create_engine(url)
    db: dict[str, Any] = {
        "candidates": defaultdict(dict),  # (candidate set, query) -> rank -> tile
        "rankings": defaultdict(lambda: defaultdict(dict)),  # run -> query -> rank -> tile
        "finished": defaultdict(set),
    }
    with engine.connect() as c:
        db["names"] = dict(c.execute(select(Query.id, Query.name)).all())
        db["runs"] = {i: (cs, k) for i, cs, k in c.execute(select(Run.id, Run.candidate_set_id, Run.k))}
        db["positive"] = dict(
            c.execute(
                select(GroundTruth.query_id, GroundTruth.tile_id).where(GroundTruth.relation == "positive")
            ).all()
        )
        for cs, q, rank, t in c.execute(
            select(Candidate.candidate_set_id, Candidate.query_id, Candidate.rank, Candidate.tile_id)
        ):
            db["candidates"][(cs, q)][rank] = t
        for run, q, rank, t in c.execute(
            select(Ranking.run_id, Ranking.query_id, Ranking.rank, Ranking.tile_id)
        ):
            db["rankings"][run][q][rank] = t
        for run, q in c.execute(
            select(RunQuery.run_id, RunQuery.query_id).where(RunQuery.done_at.is_not(None))
        ):
            db["finished"][run].add(q)
        v = PairwiseVerdict
        db["verdicts"] = [
            tuple(r)
            for r in c.execute(
                select(v.run_id, v.query_id, v.tile_first, v.tile_second, v.first_wins).where(
                    v.status == "done"
                )
            )
        ]
        s = PointwiseScore
        db["scores"] = [
            tuple(r)
            for r in c.execute(
                select(s.run_id, s.query_id, s.tile_id, s.score).where(
                    s.status == "done", s.score.is_not(None)
                )
            )
        ]
    engine.dispose()
    return db


def _plain(value: Any) -> Any:
    """PostgreSQL hands SUM and AVG of integers back as numeric."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _execute(url: str, sql: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            result = c.exec_driver_sql(sql)  # as written: no bind-parameter parsing
            return [{k: _plain(v) for k, v in row._mapping.items()} for row in result]
    finally:
        engine.dispose()


def _rank_of(order: dict[int, int], tile: int) -> int | None:
    return next((r for r, t in order.items() if t == tile), None)


# -- the checks


def test_sql_docs_on_both_databases(database, tmp_path):
    run_ids = _experiment(database, tmp_path)
    report = json.loads(orchestrator(database, "report", "--format", "json"))
    db = _stored(database)

    blocks = sql_blocks()
    assert len(blocks) == N_BLOCKS
    recall, set_recall, paired, moved, bias, agreement, top1, scores, cost = (
        _execute(database, sql) for sql in blocks
    )

    # Recall per run and its baseline: the report's Table 1, to 1e-6 (both in percent).
    runs = {r["run_id"]: r for r in report["runs"]}
    assert sorted(runs) == run_ids
    assert [r["run_id"] for r in recall] == run_ids
    for row in recall:
        run = runs[row["run_id"]]
        baseline = next(
            b for b in report["baselines"] if b["query_set"] == run["query_set"] and b["k"] == run["k"]
        )
        assert (
            (row["k"], row["n_queries"])
            == (run["k"], run["n_queries"])
            == (baseline["k"], baseline["n_queries"])
        )
        assert row["strategy"] == run["strategy"] and row["prompt_name"] == run["prompt"]
        for r, b in zip(run["recall"], baseline["recall"], strict=True):
            assert row[f"recall_at_{r['k']}"] == pytest.approx(r["value"], abs=1e-6)
            assert row[f"baseline_recall_at_{b['k']}"] == pytest.approx(b["value"], abs=1e-6)

    # Stage 1 per candidate set over all its queries, counted from the candidates.
    (row,) = set_recall
    queries = [q for cs, q in db["candidates"] if cs == row["candidate_set_id"]]
    assert row["n_queries"] == len(queries) == 30 and row["name"] == "s4g"
    ranks = [_rank_of(db["candidates"][(row["candidate_set_id"], q)], db["positive"][q]) for q in queries]
    for k in KS:
        hits = sum(1 for r in ranks if r is not None and r <= k)
        assert row[f"recall_at_{k}"] == pytest.approx(100.0 * hits / len(queries), abs=1e-6)

    # Fixed and broken at top-1: the report's paired comparison with the baseline.
    against_baseline = {
        c["run_id"]: c for c in report["comparisons"] if c["against"] == "baseline" and c["k"] == 1
    }
    assert [r["run_id"] for r in paired] == run_ids
    for row in paired:
        c = against_baseline[row["run_id"]]
        assert (row["queries"], row["fixed_at_1"], row["broken_at_1"]) == (c["n"], c["fixed"], c["broken"])
    assert any(r["fixed_at_1"] for r in paired) and any(r["broken_at_1"] for r in paired)

    # Moved positives in the latest run, from its rankings and the candidates within its K.
    latest = max(run_ids)
    cs, k = db["runs"][latest]
    expected_moves = {}
    for q in db["finished"][latest]:
        before = _rank_of({r: t for r, t in db["candidates"][(cs, q)].items() if r <= k}, db["positive"][q])
        after = _rank_of(db["rankings"][latest][q], db["positive"][q])
        if before is not None and after != before:
            expected_moves[db["names"][q]] = (before, after, "up" if after < before else "down")
    assert {r["run_id"] for r in moved} == {latest}
    assert {r["query"]: (r["stage1_rank"], r["final_rank"], r["moved"]) for r in moved} == expected_moves
    assert {m for *_, m in expected_moves.values()} == {"up", "down"}

    # Position bias: the report's figures for each pairwise run.
    pairwise = [i for i, args in zip(run_ids, RUNS, strict=True) if "pointwise" not in args]
    report_bias = {r["run_id"]: r["bias"] for r in report["position_bias"]}
    assert [r["run_id"] for r in bias] == sorted(report_bias) == pairwise
    for row in bias:
        b = report_bias[row["run_id"]]
        assert row["comparisons"] == b["n"]
        assert row["first_shown_wins"] == pytest.approx(b["observed"], abs=1e-9)
        assert row["stage1_predicts"] == pytest.approx(b["expected"], abs=1e-9)
        for where in ("first", "second"):
            shown = b[f"positive_{where}"]
            assert row[f"positive_shown_{where}"] == shown["n"] > 0
            assert row[f"positive_wins_shown_{where}"] == pytest.approx(shown["hits"] / shown["n"], abs=1e-9)
    biased = {r["run_id"]: r for r in bias}[run_ids[1]]
    assert biased["positive_wins_shown_second"] < biased["positive_wins_shown_first"]

    # Agreement on the comparisons two pairwise runs both made, in either order shown.
    winners: dict[int, dict[tuple[int, int, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for run, q, first, second, first_wins in db["verdicts"]:
        winners[run][(q, min(first, second), max(first, second))].append(first if first_wins else second)
    expected_agreement = {}
    for a, b in combinations(sorted(winners), 2):
        pairs = [(x, y) for key, xs in winners[a].items() for x in xs for y in winners[b].get(key, [])]
        if pairs:
            expected_agreement[(a, b)] = (len(pairs), sum(x == y for x, y in pairs))
    assert (run_ids[0], run_ids[1]) in expected_agreement
    assert {(r["run_a"], r["run_b"]): (r["shared_comparisons"], r["same_winner"]) for r in agreement} == (
        expected_agreement
    )
    for r in agreement:
        assert r["agreement"] == pytest.approx(r["same_winner"] / r["shared_comparisons"], abs=1e-9)

    # Same top-1, for every pair of runs with finished queries in common.
    expected_top1 = {}
    for a, b in combinations(run_ids, 2):
        shared = [q for q in db["rankings"][a] if q in db["rankings"][b]]
        if shared:
            same = sum(db["rankings"][a][q][1] == db["rankings"][b][q][1] for q in shared)
            expected_top1[(a, b)] = (len(shared), same)
    assert len(expected_top1) == len(list(combinations(run_ids, 2)))
    assert {(r["run_a"], r["run_b"]): (r["shared_queries"], r["same_top1"]) for r in top1} == expected_top1
    for r in top1:
        assert r["same_top1_share"] == pytest.approx(r["same_top1"] / r["shared_queries"], abs=1e-9)

    # Pointwise scores of positives against the rest, from the stored scores; as many as the
    # report's calibration counts.
    by_run: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for run, q, tile, score in db["scores"]:
        by_run[run][0 if tile == db["positive"][q] else 1].append(score)
    calibration = {c["run_id"]: c for c in report["calibration"] if c["kind"] == "pointwise"}
    assert [r["run_id"] for r in scores] == sorted(by_run) == sorted(calibration) == [run_ids[2]]
    for row in scores:
        pos, rest = by_run[row["run_id"]]
        assert (row["positives_scored"], row["others_scored"]) == (len(pos), len(rest))
        assert row["positives_scored"] + row["others_scored"] == calibration[row["run_id"]]["n"]
        assert row["positive_mean_score"] == pytest.approx(sum(pos) / len(pos), abs=1e-9)
        assert row["other_mean_score"] == pytest.approx(sum(rest) / len(rest), abs=1e-9)
        assert row["positive_mean_score"] > row["other_mean_score"]

    # Cost per run: the report's cost rows.
    costs = {c["run_id"]: c for c in report["costs"]}
    assert [r["run_id"] for r in cost] == sorted(costs) == run_ids
    for row in cost:
        c = costs[row["run_id"]]
        assert row["finished_queries"] == c["n_queries"] == len(db["finished"][row["run_id"]])
        assert row["judgments"] == c["judgments"]
        assert row["judgments_per_query"] == pytest.approx(c["judgments_per_query_mean"], abs=1e-9)
        assert row["max_judgments_per_query"] == c["judgments_per_query_max"]
        assert (row["failed_judgments"], row["reused_judgments"]) == (
            c["failed_judgments"],
            c["reused_judgments"],
        )
        # The report rounds judge seconds to the microsecond.
        assert row["judge_seconds_per_query"] == pytest.approx(c["gpu_seconds_per_query"], abs=5e-7)

    # The SQL shown elsewhere (the retrieval view in docs/retrieval.md) runs on this database too.
    for sql in other_docs_sql():
        assert len(_execute(database, sql)) == len(report["retrieval"]) == 0
