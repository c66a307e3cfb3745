"""Table 1, figures and the README's SQL over a real experiment on PostgreSQL, Redis and Celery workers.

Recall@k is checked against ranx (with one positive per query the paper's R@k is ranx's
hit_rate@k), the paired tests against counts read straight from the rankings, and every SQL block
of the README's "SQL for analysis" section is run through psql.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from ranx import Qrels, Run, evaluate
from scipy.stats import binomtest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Candidate, GroundTruth, PairwiseVerdict, PointwiseScore, Query, Ranking, RunQuery, Tile
from orchestrator.cli import cli as orchestrator_cli
from orchestrator.figures import bias_panels
from orchestrator.submit import sample_queries
from tests.builders import candidates_from_csv
from tests.integration.conftest import REPO, cli
from workers.prompts import load_prompt

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
    """Seeds for the three runs' query samples: 2 overlaps 1; 3 overlaps 1 but shares none with 2."""
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


def _experiment(stack_env, dataset, workers) -> tuple[int, int, int]:
    """Pairwise at two accuracies (the second with position bias) and Yes/No, on different samples."""
    seeds = _samples(dataset)
    orchestrator(stack_env, "ingest", str(dataset))
    orchestrator(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    workers(["coordination"], "coordinator")
    runs = [
        ["--accuracy", "0.9", "--queries", "24", "--seed", str(seeds[0])],
        ["--accuracy", "0.7", "--position-bias", "0.3", "--queries", "12", "--seed", str(seeds[1])],
        ["--strategy", "pointwise", "--accuracy", "0.8", "--queries", "12", "--seed", str(seeds[2])],
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


def _readme_sql_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## SQL for analysis", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def _psql(pg_url: str, sql: str) -> list[dict[str, str]]:
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed to test the README's SQL"
    url = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    proc = subprocess.run(
        [psql, url, "--csv", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def _check_table1(stack_env, db: dict, run_ids: tuple[int, int], tmp_path: Path) -> dict[int, dict]:
    """Report two runs of different samples; check every number against an independent count."""
    positives = db["positive"]
    shared = db["finished"][run_ids[0]] & db["finished"][run_ids[1]]
    assert 0 < len(shared) < min(len(db["finished"][r]) for r in run_ids)
    out = tmp_path / f"table-{run_ids[1]}"
    proc = orchestrator(stack_env, "report", *map(str, run_ids), "--format", "json", "--resamples", "2000")
    proc_out = orchestrator(stack_env, "report", *map(str, run_ids), "--resamples", "2000", "--out", str(out))
    rows = json.loads(proc.stdout)
    # Compared only on the shared queries, and the report says so.
    assert f"only the {len(shared)} queries all of them finished" in proc.stderr
    assert "note: the runs of candidate set 's4g' finished different query sets" in proc_out.stdout
    base, *runs = rows
    assert base["strategy"] == "baseline" and [r["run_id"] for r in runs] == list(run_ids)
    for r in rows:
        assert {"run_id", "strategy", "prompt", "judge", "model", "n_queries"} <= set(r)
        assert r["n_queries"] == len(shared)
        for k in KS:
            assert r[f"recall@{k}_ci_low"] <= r[f"recall@{k}"] <= r[f"recall@{k}_ci_high"]
    assert [r["n_finished"] for r in runs] == [len(db["finished"][i]) for i in run_ids]

    # R@k equals ranx's hit rate@k on the same queries, for the baseline and both runs.
    by_ranx = _ranx_recall(
        {"stage 1": db["candidates"], **{i: db["rankings"][i] for i in run_ids}}, positives, shared
    )
    for k in KS:
        assert base[f"recall@{k}"] == pytest.approx(by_ranx["stage 1"][k])
        for r in runs:
            assert r[f"recall@{k}"] == pytest.approx(by_ranx[r["run_id"]][k]), (r["run_id"], k)

    for r in runs:
        # Paired tests, recounted from the rankings and candidates.
        final = {q: _rank_of(db["rankings"][r["run_id"]][q], positives[q]) for q in shared}
        first = {q: _rank_of(db["candidates"][q], positives[q]) for q in shared}
        fixed = sum(1 for q in shared if final[q] == 1 and first[q] != 1)
        broken = sum(1 for q in shared if first[q] == 1 and final[q] != 1)
        assert (r["top1_fixed"], r["top1_broken"]) == (fixed, broken)
        expected_p = 1.0 if fixed + broken == 0 else binomtest(min(fixed, broken), fixed + broken).pvalue
        assert r["mcnemar_p"] == pytest.approx(expected_p)
        for k in KS:
            assert r[f"delta@{k}"] == pytest.approx(r[f"recall@{k}"] - base[f"recall@{k}"])
            assert r[f"delta@{k}_ci_low"] <= r[f"delta@{k}"] <= r[f"delta@{k}_ci_high"]
            assert 0 < r[f"delta@{k}_p"] <= 1
        # Cost: judgments per finished query, counted from the judgment tables; provenance.
        counts = [db["judgments"][r["run_id"]][q] for q in db["finished"][r["run_id"]]]
        assert r["judgments_per_query_mean"] == pytest.approx(sum(counts) / len(counts))
        assert r["judgments_per_query_max"] == max(counts)
        assert r["failed_judgments"] == 0 and r["gpu_seconds_per_query"] >= 0
        assert r["model_revision"] == "simulated-v1"
        assert r["prompt_sha256"] == load_prompt(r["prompt"]).sha256

    # --out wrote every format; the JSON file is what was printed.
    assert sorted(p.name for p in out.iterdir()) == ["table1.csv", "table1.json", "table1.md", "table1.txt"]
    assert json.loads((out / "table1.json").read_text()) == rows
    assert (out / "table1.md").read_text().startswith("**Table 1.")
    assert "McNemar p" in proc_out.stdout and "GPU s/query" in proc_out.stdout
    header = (out / "table1.csv").read_text().splitlines()[0].split(",")
    assert header[:11] == ["run_id", "candidates", "strategy", "prompt", "judge", "model", "n_queries",
                           "recall@1", "recall@3", "recall@5", "recall@10"]  # fmt: skip
    assert "mcnemar_p" in header and "gpu_seconds_per_query" in header
    return {r["run_id"]: r for r in runs}


def test_report_figures_and_readme_sql_on_a_real_experiment(stack_env, dataset, pg_url, workers, tmp_path):
    good, biased, yesno = _experiment(stack_env, dataset, workers)
    assert (good, biased, yesno) == (1, 2, 3)  # the README's psql variables name these runs
    db = _stored(pg_url)
    positives = db["positive"]

    # -- Table 1, paired tests and cost, each pair of runs on the queries both finished.
    by_run = _check_table1(stack_env, db, (good, biased), tmp_path)
    by_run.update(_check_table1(stack_env, db, (good, yesno), tmp_path))
    assert by_run[yesno]["judgments_per_query_max"] == 20

    # Runs without a finished query in common are refused, not compared.
    assert not db["finished"][biased] & db["finished"][yesno]
    for args in ([str(biased), str(yesno)], []):
        disjoint = orchestrator(stack_env, "report", *args, check=False)
        assert disjoint.exit_code == 1 and disjoint.stdout == ""
        assert "share no finished query, so they cannot be compared" in disjoint.stderr

    # -- Figures and the page.
    out = tmp_path / "figs"
    figs = orchestrator(stack_env, "figures", str(good), str(biased), "--out", str(out), "--examples", "2")
    query = sorted(db["finished"][yesno])[0]
    orchestrator(stack_env, "figures", str(yesno), "--out", str(out / "yesno"), "--query", query)
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == [
        "figure4_recall.png",
        "figure5_run1.png",
        "figure5_run2.png",
        "index.html",
        "position_bias.png",
    ]
    assert sorted(p.name for p in (out / "yesno").iterdir()) == [
        "figure3_scores.png",
        "figure4_recall.png",
        "figure5_run3.png",
        "index.html",
    ]
    assert f"wrote {out / 'index.html'}" in figs.stdout
    for png in [*out.glob("*.png"), *(out / "yesno").glob("*.png")]:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 400
    page = (out / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in names if n.endswith(".png"))
    assert "Table 1." in page and "McNemar p" in page
    bad_query = orchestrator(
        stack_env, "figures", str(good), "--out", str(tmp_path / "f"), "--query", "nope.jpg", check=False
    )
    assert bad_query.exit_code == 1 and "has no finished query named 'nope.jpg'" in bad_query.stderr

    # -- Every README query runs in psql and agrees with the report and the stored rows.
    blocks = _readme_sql_blocks()
    assert len(blocks) == 6
    recall, bias, agreement, top1, moved, cost = (_psql(pg_url, b) for b in blocks)

    own = json.loads(
        orchestrator(stack_env, "report", str(good), "--format", "json", "--resamples", "200").stdout
    )
    assert own[1]["n_queries"] == 24
    r1 = {int(r["run_id"]): r for r in recall}
    assert set(r1) == {good, biased, yesno}
    assert float(r1[good]["r1"]) == pytest.approx(own[1]["recall@1"], abs=0.005)
    assert float(r1[good]["r10"]) == pytest.approx(own[1]["recall@10"], abs=0.005)
    assert float(r1[good]["baseline_r1"]) == pytest.approx(own[0]["recall@1"], abs=0.005)

    engine = create_engine(pg_url)
    with Session(engine) as s:
        panels = bias_panels(s, [{"run_id": i, "strategy": "pairwise"} for i in (good, biased)])
    engine.dispose()
    by_bias = {int(r["run_id"]): r for r in bias}
    assert set(by_bias) == {good, biased}
    for run_id, panel in zip((good, biased), panels, strict=True):
        row = by_bias[run_id]
        assert int(row["comparisons"]) == panel.bias.n
        assert float(row["first_shown_wins"]) == pytest.approx(panel.bias.observed, abs=5e-4)
        assert float(row["stage1_predicts"]) == pytest.approx(panel.bias.expected, abs=5e-4)
        assert float(row["positive_wins_shown_first"]) == pytest.approx(
            panel.bias.positive_first_wins, abs=5e-4
        )
        assert float(row["positive_wins_shown_second"]) == pytest.approx(
            panel.bias.positive_second_wins, abs=5e-4
        )
    # The judge with position bias finds the positive less often when it is shown second.
    assert float(by_bias[biased]["positive_wins_shown_second"]) < float(
        by_bias[biased]["positive_wins_shown_first"]
    )

    verdicts = defaultdict(dict)
    for run, q, a, b, first_wins in db["verdicts"]:
        verdicts[run][(q, a, b)] = first_wins
    same = agree = 0
    for (q, a, b), w in verdicts[good].items():
        if (q, a, b) in verdicts[biased]:
            same, agree = same + 1, agree + (w == verdicts[biased][(q, a, b)])
        elif (q, b, a) in verdicts[biased]:
            same, agree = same + 1, agree + (w != verdicts[biased][(q, b, a)])
    assert int(agreement[0]["shared_comparisons"]) == same > 0
    assert float(agreement[0]["agreement"]) == pytest.approx(agree / same, abs=5e-4)

    both = db["finished"][good] & db["finished"][yesno]
    same_top1 = sum(1 for q in both if db["rankings"][good][q][1] == db["rankings"][yesno][q][1])
    assert int(top1[0]["shared_queries"]) == len(both) > 0
    assert float(top1[0]["same_top1"]) == pytest.approx(same_top1 / len(both), abs=5e-4)

    expected_moves = {}
    for q in db["finished"][good]:
        before = _rank_of({r: t for r, t in db["candidates"][q].items() if r <= 20}, positives[q])
        after = _rank_of(db["rankings"][good][q], positives[q])
        if before is not None and after != before:
            expected_moves[q] = "up" if after < before else "down"
    assert {r["query"]: r["moved"] for r in moved} == expected_moves
    assert "up" in expected_moves.values()

    costs = {int(r["run_id"]): r for r in cost}
    for run_id, row in by_run.items():
        assert float(costs[run_id]["judgments_per_query"]) == pytest.approx(
            row["judgments_per_query_mean"], abs=0.05
        )
        assert int(costs[run_id]["max_per_query"]) == row["judgments_per_query_max"]
        assert int(costs[run_id]["failed"]) == row["failed_judgments"]
        assert costs[run_id]["prompt_sha256"] == row["prompt_sha256"][:12]


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
        "## SQL for analysis",
    ):
        assert needle in text
