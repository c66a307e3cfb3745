"""The report, figures and page over a real experiment on PostgreSQL, Redis and Celery workers.

Recall@k is checked against ranx (with one positive per query the paper's R@k is ranx's
hit_rate@k) on each run's own queries and at each run's K, the paired tests against counts read
straight from the rankings and scipy, and the provenance against what was submitted.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from ranx import Qrels, Run, evaluate
from scipy.stats import binomtest
from sqlalchemy import create_engine, select, text

from db.models import Candidate, GroundTruth, PairwiseVerdict, PointwiseScore, Query, Ranking, RunQuery, Tile
from orchestrator.cli import cli as orchestrator_cli
from orchestrator.reporting.stats import holm
from orchestrator.submit import sample_queries
from tests.builders import candidates_from_csv
from tests.integration.conftest import REPO, cli

pytestmark = pytest.mark.integration

KS = (1, 3, 5, 10)


def _run_id(proc) -> int:
    return int(proc.stdout.split()[-1])


def orchestrator(env: dict[str, str], *args: str, check: bool = True) -> Result:
    """The CLI in this process, for commands that need no broker: saves a Python start-up per call."""
    settings = {k: v for k, v in env.items() if k.startswith("CVGL_")}
    result = CliRunner().invoke(orchestrator_cli, list(args), env=settings, catch_exceptions=False)
    if check and result.exit_code != 0:
        raise AssertionError(f"orchestrator {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return result


def _samples(dataset: Path) -> tuple[int, int, int]:
    """Seeds for the runs' query samples: 2 overlaps 1; 3 overlaps 1 but shares none with 2."""
    names = {q: i for i, q in enumerate(candidates_from_csv(dataset / "candidates.csv"))}
    good = set(sample_queries(names, 24, 0))
    biased = set(sample_queries(names, 12, 3))
    assert good & biased and biased - good
    yesno = next(
        s
        for s in range(1, 10_000)
        if good & set(sample_queries(names, 12, s)) and not biased & set(sample_queries(names, 12, s))
    )
    return 0, 3, yesno


def _experiment(stack_env, dataset, workers) -> tuple[int, int, int, int]:
    """Pairwise at two accuracies (the second with position bias), Yes/No, and pairwise at K=5."""
    seeds = _samples(dataset)
    orchestrator(stack_env, "ingest", str(dataset))
    orchestrator(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    workers(["coordination"], "coordinator")
    runs = [
        ["--accuracy", "0.9", "--queries", "24", "--seed", str(seeds[0])],
        ["--accuracy", "0.7", "--position-bias", "0.3", "--queries", "12", "--seed", str(seeds[1])],
        ["--strategy", "pointwise", "--accuracy", "0.8", "--queries", "12", "--seed", str(seeds[2])],
        ["--accuracy", "0.9", "--queries", "24", "--seed", str(seeds[0]), "--k", "5"],
    ]
    ids = tuple(_run_id(cli(stack_env, "submit", *args, "--wait")) for args in runs)
    return ids  # type: ignore[return-value]


def _stored(pg_url) -> dict:
    """Everything the independent checks need, read with plain SELECTs."""
    engine = create_engine(pg_url)
    out: dict = {"rankings": defaultdict(dict), "finished": defaultdict(set)}
    with engine.connect() as c:
        names = dict(c.execute(select(Query.id, Query.name)).all())
        tiles = dict(c.execute(select(Tile.id, Tile.name)).all())
        out["positive"] = {
            names[q]: tiles[t]
            for q, t in c.execute(
                select(GroundTruth.query_id, GroundTruth.tile_id).where(GroundTruth.relation == "positive")
            )
        }
        for run, q, rank, t in c.execute(
            select(Ranking.run_id, Ranking.query_id, Ranking.rank, Ranking.tile_id)
        ):
            out["rankings"][run].setdefault(names[q], {})[rank] = tiles[t]
        for run, q in c.execute(
            select(RunQuery.run_id, RunQuery.query_id).where(RunQuery.done_at.is_not(None))
        ):
            out["finished"][run].add(names[q])
        out["candidates"] = defaultdict(dict)
        for q, rank, t in c.execute(select(Candidate.query_id, Candidate.rank, Candidate.tile_id)):
            out["candidates"][names[q]][rank] = tiles[t]
        out["verdicts"] = [
            tuple(r)
            for r in c.execute(
                select(
                    PairwiseVerdict.run_id,
                    PairwiseVerdict.query_id,
                    PairwiseVerdict.tile_first,
                    PairwiseVerdict.tile_second,
                    PairwiseVerdict.first_wins,
                ).where(PairwiseVerdict.status == "done")
            )
        ]
        out["judgments"] = defaultdict(lambda: defaultdict(int))
        for model in (PairwiseVerdict, PointwiseScore):
            for run, q in c.execute(select(model.run_id, model.query_id).where(model.status != "pending")):
                out["judgments"][run][names[q]] += 1
    engine.dispose()
    return out


def _ranx_recall(
    orders: dict[object, dict[str, dict[int, str]]], positives: dict[str, str], queries: set[str]
) -> dict[object, dict[int, float]]:
    """ranx hit_rate@k in percent (the share of queries with the positive in the first k), per order set."""
    qrels = Qrels({q: {positives[q]: 1} for q in sorted(queries)})
    out = {}
    for name, order in orders.items():
        run = Run({q: {t: float(100 - r) for r, t in order[q].items()} for q in sorted(queries)})
        scores = evaluate(qrels, run, [f"hit_rate@{k}" for k in KS], make_comparable=True)
        out[name] = {k: 100.0 * scores[f"hit_rate@{k}"] for k in KS}
    return out


def _rank_of(order: dict[int, str], tile: str) -> int | None:
    return next((r for r, t in order.items() if t == tile), None)


def _ranx_recall(
    order: dict[str, dict[int, str]], positives: dict[str, str], queries: set[str]
) -> dict[int, float]:
    """ranx hit_rate@k in percent: the share of ``queries`` with the positive in the first k."""
    qrels = Qrels({q: {positives[q]: 1} for q in sorted(queries)})
    run = Run({q: {t: float(100 - r) for r, t in order[q].items()} for q in sorted(queries)})
    scores = evaluate(qrels, run, [f"hit_rate@{k}" for k in KS], make_comparable=True)
    return {k: 100.0 * scores[f"hit_rate@{k}"] for k in KS}


def _rank_of(order: dict[int, str], tile: str) -> int | None:
    return next((r for r, t in order.items() if t == tile), None)


def _recall(row: dict) -> dict[int, dict]:
    return {r["k"]: r for r in row["recall"]}


def _check_report(report: dict, db: dict, run_ids: tuple[int, ...], common: bool = False) -> None:
    """Every run row, baseline row and test of ``report`` against independent counts."""
    positives = db["positive"]
    queries = {i: set(db["finished"][i]) for i in run_ids}
    if common:
        shared = set.intersection(*queries.values())
        queries = {i: shared for i in run_ids}
    runs = {r["run_id"]: r for r in report["runs"]}
    assert list(runs) == list(run_ids)
    pvalues = [c["p_value"] for c in report["comparisons"]]
    assert [c["p_holm"] for c in report["comparisons"]] == pytest.approx(holm(pvalues))
    for run_id in run_ids:
        row, q = runs[run_id], queries[run_id]
        k_cut = row["k"]
        assert row["n_queries"] == len(q) and row["n_finished"] == len(db["finished"][run_id])
        (base,) = [b for b in report["baselines"] if b["query_set"] == row["query_set"] and b["k"] == k_cut]
        assert base["n_queries"] == len(q)
        # R@k of the run, and of stage 1 cut at the run's K, equal ranx's hit rate on these queries.
        stage1 = {
            name: {r: t for r, t in order.items() if r <= k_cut} for name, order in db["candidates"].items()
        }
        by_ranx = _ranx_recall(db["rankings"][run_id], positives, q)
        base_ranx = _ranx_recall(stage1, positives, q)
        for k in KS:
            got, got_base = _recall(row)[k], _recall(base)[k]
            assert got["value"] == pytest.approx(by_ranx[k]) and got_base["value"] == pytest.approx(
                base_ranx[k]
            )
            ci = binomtest(got["hits"], got["n"]).proportion_ci(report["confidence"], method="wilson")
            assert (got["low"], got["high"]) == pytest.approx((100 * ci.low, 100 * ci.high))
            # The paired test: fixed and broken queries recounted, exact McNemar = scipy's binomial test.
            final = {x: _rank_of(db["rankings"][run_id][x], positives[x]) for x in q}
            first = {x: _rank_of(stage1[x], positives[x]) for x in q}
            fixed = sum(1 for x in q if (final[x] or 99) <= k < (first[x] or 99))
            broken = sum(1 for x in q if (first[x] or 99) <= k < (final[x] or 99))
            (c,) = [
                c
                for c in report["comparisons"]
                if (c["run_id"], c["against"], c["k"]) == (run_id, "baseline", k)
            ]
            assert (c["n"], c["fixed"], c["broken"]) == (len(q), fixed, broken)
            p = 1.0 if fixed + broken == 0 else binomtest(min(fixed, broken), fixed + broken).pvalue
            assert c["p_value"] == pytest.approx(p, rel=1e-12)
            assert c["delta"] == pytest.approx(got["value"] - got_base["value"])
            assert c["low"] <= c["delta"] <= c["high"]


def test_report_figures_and_page_on_a_real_experiment(stack_env, dataset, pg_url, workers, tmp_path):
    good, biased, yesno, k5 = _experiment(stack_env, dataset, workers)
    db = _stored(pg_url)

    # -- Each run on its own finished queries, against the baseline on those queries at its K.
    report = json.loads(orchestrator(stack_env, "report", "--format", "json").stdout)
    _check_report(report, db, (good, biased, yesno, k5))
    labels = {r["run_id"]: r["query_set"] for r in report["runs"]}
    assert labels[good] == labels[k5] != labels[biased] != labels[yesno]  # same sample, same set
    assert len(report["query_sets"]) == 3 and len(report["baselines"]) == 4  # Q1 at K=20 and at K=5
    assert any("rows are on 3 different query sets" in n for n in report["notes"])
    # The K=5 run's baseline is cut at 5 (R@10 = R@5 = the view's), unlike the K=20 runs' baseline.
    runs = {r["run_id"]: r for r in report["runs"]}
    (b5,) = [b for b in report["baselines"] if b["k"] == 5]
    (b20,) = [b for b in report["baselines"] if b["k"] == 20 and b["query_set"] == labels[good]]
    assert _recall(b5)[10]["value"] == _recall(b5)[5]["value"] < _recall(b20)[10]["value"]
    engine = create_engine(pg_url)
    with engine.connect() as c:
        view = {r.run_id: r._mapping for r in c.execute(text("SELECT * FROM run_recall"))}
    engine.dispose()
    for run_id, row in runs.items():
        base = next(
            b for b in report["baselines"] if (b["query_set"], b["k"]) == (row["query_set"], row["k"])
        )
        for k in KS:
            assert view[run_id][f"baseline_recall_at_{k}"] == pytest.approx(_recall(base)[k]["value"])
            assert view[run_id][f"recall_at_{k}"] == pytest.approx(_recall(row)[k]["value"])
    # Provenance: the judge's complete options as stored at submit, K and status on every row.
    assert runs[biased]["judge_options"] == {
        "accuracy": 0.7, "position_bias": 0.3, "noise": 0.0, "latency_ms": 0.0, "poison": [], "seed": 3,
        "decode": "choices", "batch_size": 64,
    }  # fmt: skip
    assert runs[yesno]["judge_options"]["accuracy"] == 0.8 and "decode" not in runs[yesno]["judge_options"]
    assert runs[k5]["k"] == 5 and runs[good]["k"] == 20 and runs[good]["status"] == "done"
    # Calibration of every run: pointwise scores and pairwise P(first), with an ECE.
    kinds = {(c["run_id"], c["kind"]) for c in report["calibration"]}
    assert kinds == {(good, "pairwise"), (biased, "pairwise"), (yesno, "pointwise"), (k5, "pairwise")}
    assert all(
        0.0 <= c["ece"] <= 1.0 and c["n"] == sum(b["n"] for b in c["bins"]) for c in report["calibration"]
    )
    # The biased judge finds the positive less often when it is shown second.
    bias = {b["run_id"]: b["bias"] for b in report["position_bias"]}
    first, second = bias[biased]["positive_first"], bias[biased]["positive_second"]
    assert second["hits"] / second["n"] < first["hits"] / first["n"]

    # -- The same in the other formats: the table's header says which queries each row is on.
    out = tmp_path / "table"
    table = orchestrator(stack_env, "report", "--out", str(out)).stdout
    words = " ".join(table.split())  # notes wrap at 120 columns
    assert "rows are on 3 different query sets" in words and "Wilson" in words and "Holm" in words
    assert max(map(len, table.splitlines())) <= 120 and "--wide for all columns" in table
    wide = orchestrator(stack_env, "report", "--wide").stdout
    assert max(map(len, wide.splitlines())) > 120 and "position_bias=0.3" in wide
    assert sorted(p.name for p in out.iterdir()) == ["table1.csv", "table1.json", "table1.md", "table1.txt"]
    assert (out / "table1.txt").read_text() == wide
    assert json.loads((out / "table1.json").read_text()) == report
    assert (out / "table1.md").read_text().startswith("> Recall@k (%) with 95% Wilson score intervals")
    csv_rows = list(csv.DictReader(io.StringIO((out / "table1.csv").read_text())))
    by_run = {r["run_id"]: r for r in csv_rows if r["kind"] == "run"}
    assert by_run[str(k5)]["k"] == "5" and by_run[str(k5)]["query_set"] == labels[k5]
    assert json.loads(by_run[str(biased)]["judge_options"])["position_bias"] == 0.3
    assert float(by_run[str(good)]["p_mcnemar@1"]) == pytest.approx(
        next(
            c["p_value"]
            for c in report["comparisons"]
            if (c["run_id"], c["against"], c["k"]) == (good, "baseline", 1)
        )
    )
    assert {"recall@1_wilson_low", "delta_newcombe_low@1", "p_holm@10"} <= set(csv_rows[0])

    # -- --common: every row of the set on the queries all listed runs finished, runs compared pairwise.
    common = json.loads(
        orchestrator(stack_env, "report", str(good), str(biased), "--common", "--format", "json").stdout
    )
    _check_report(common, db, (good, biased), common=True)
    assert len(common["query_sets"]) == 1 and any(
        c["against"] == f"run {biased}" for c in common["comparisons"]
    )
    disjoint = orchestrator(stack_env, "report", str(biased), str(yesno), "--common", check=False)
    assert disjoint.exit_code == 1 and "share no finished query" in disjoint.stderr

    # -- Figures and the page.
    figs = tmp_path / "figs"
    printed = orchestrator(
        stack_env, "figures", str(good), str(biased), str(k5), "--out", str(figs), "--examples", "2"
    )
    query = sorted(db["finished"][yesno])[0]
    orchestrator(stack_env, "figures", str(yesno), "--out", str(figs / "yesno"), "--query", query)
    names = sorted(p.name for p in figs.iterdir() if p.is_file())
    assert {"figure4_recall.png", "calibration.png", "position_bias.png", "index.html",
            f"figure5_run{good}.png", f"figure5_run{k5}.png"} <= set(names)  # fmt: skip
    assert {"figure3_scores.png", "calibration.png", f"figure5_run{yesno}.png"} <= {
        p.name for p in (figs / "yesno").iterdir()
    }
    assert f"wrote {figs / 'index.html'}" in printed.stdout
    for png in [*figs.glob("*.png"), *(figs / "yesno").glob("*.png")]:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 400
    page = (figs / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in names if n.endswith(".png"))
    assert "Table 1." in page and "McNemar" in page and "K=5" in page
    bad_query = orchestrator(
        stack_env, "figures", str(good), "--out", str(tmp_path / "f"), "--query", "nope.jpg", check=False
    )
    assert bad_query.exit_code == 1 and "has no finished query named 'nope.jpg'" in bad_query.stderr


def test_report_refuses_bad_input_cleanly(stack_env, pg_url, tmp_path):
    missing = cli(stack_env, "report", "7", check=False)  # as a user sees it
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: no run with id 7"
    assert "Traceback" not in missing.stderr
    unknown = orchestrator(stack_env, "figures", "9", "--out", str(tmp_path / "f"), check=False)
    assert unknown.exit_code == 1 and "no run with id 9" in unknown.stderr

    # An output folder that cannot be written: a file in the way, or a folder under a file.
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        for command in ("report", "figures"):
            proc = orchestrator(stack_env, command, "--out", str(out), check=False)
            assert proc.exit_code == 1, proc.output
            assert proc.stderr.startswith(f"Error: cannot write to {out}")
            assert proc.stdout == ""
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = orchestrator(stack_env, "report", "--out", str(locked), check=False)
        assert proc.exit_code == 1 and "Permission denied" in proc.stderr


def test_readme_documents_the_report_options():
    text = Path(REPO / "README.md").read_text()
    for needle in (
        "--format table\\|markdown\\|csv\\|json",
        "--out DIR",
        "orchestrator figures",
        "--common",
    ):
        assert needle in text
