"""A run reranked with a fine-tuned adapter in the report: its model is named with the adapter in
every format, a run whose adapter saw some of its queries is marked with a note saying how many,
and zero-shot and fine-tuned runs on the same queries sit side by side with their paired tests."""

from __future__ import annotations

import csv
import html
import io
import json
import re

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from db.adapters import adapter_named, overlapping_queries
from db.models import Run, RunQuery
from orchestrator.cli import cli
from orchestrator.reporting.build import build_report
from orchestrator.reporting.page import render_page
from orchestrator.reporting.render import run_label
from tests.unit.test_training_figures import add_adapter, embedded  # noqa: F401  (a fixture)

ZERO_SHOT = "simulated"
TUNED = "simulated + adapter city-lora"
LEAKY = "simulated + adapter leaky†"
NOTE = (
    "† run 3: 8 of its queries were in adapter leaky's training or validation queries "
    "(submitted with --allow-overlap)"
)


def run(*args: str):
    out = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert out.exit_code == 0, (args, out.output)
    return out


def _with_adapter(sf, run_id: int, name: str, allow_overlap: bool = False) -> int:
    """Store on the run what ``submit --adapter NAME`` stores: the adapter's name, hash and how
    many of the run's queries it saw (the simulated judge has no weights to adapt)."""
    with sf.begin() as s:
        adapter = adapter_named(s, name)
        queries = list(s.scalars(select(RunQuery.query_id).where(RunQuery.run_id == run_id)))
        seen = overlapping_queries(s, adapter.id, queries)
        assert bool(seen) == allow_overlap
        r = s.get(Run, run_id)
        judge_options = {
            **r.params["judge_options"],
            "adapter": f"{adapter.output_dir}/adapter",
            "adapter_sha256": adapter.adapter_sha256,
        }
        r.params = {
            **r.params,
            "judge_options": judge_options,
            "adapter": {"name": name, "sha256": adapter.adapter_sha256, "overlap": len(seen)},
        }
        return len(seen)


@pytest.fixture
def runs(embedded):  # noqa: F811
    """On the test cities: run 1 zero-shot, run 2 with an adapter trained on the train cities, run 3
    with an adapter that saw 8 of its queries (all three on the same 20 queries); run 4 zero-shot on
    another sample of 12."""
    for accuracy in ("0.7", "0.95", "0.9"):
        run("submit", "--candidates", "test", "--k", "10", "--queries", "20", "--accuracy", accuracy)
    run("submit", "--candidates", "test", "--k", "10", "--queries", "12", "--seed", "1", "--accuracy", "0.8")
    add_adapter(embedded, "city-lora")  # trained on the train cities' queries
    with embedded() as s:
        run3 = sorted(s.scalars(select(RunQuery.query_id).where(RunQuery.run_id == 3)))
    add_adapter(embedded, "leaky", candidates="test", queries=run3[:8])  # on 8 of run 3's queries
    assert _with_adapter(embedded, 2, "city-lora") == 0
    assert _with_adapter(embedded, 3, "leaky", allow_overlap=True) == 8
    return embedded


def _table1_rows(text: str) -> dict[str, str]:
    """run id -> its Table 1 line in the wide text table."""
    table = text.split("Table 1.")[1].split("\n\n")[0]
    return {m[1]: m[0] for m in re.finditer(r"^(\d+)\s+Q\d.*$", table, flags=re.M)}


def test_every_format_names_the_adapter_and_marks_the_overlap(runs):
    wide = run("report", "1", "2", "3", "--format", "table", "--wide").stdout
    rows = _table1_rows(wide)
    assert re.search(rf"\s{ZERO_SHOT}\s{{2,}}\d", rows["1"]) and "adapter" not in rows["1"]
    assert f"  {TUNED}  " in rows["2"] and "†" not in rows["2"]
    assert f"  {LEAKY}  " in rows["3"]
    assert f"note: {NOTE}" in wide
    assert wide.count("†") == 2  # the mark and its note, nothing for run 2
    narrow = run("report", "1", "2", "3").stdout
    assert " ".join(NOTE.split()) in " ".join(narrow.replace("note: ", "").split())
    assert "leaky†" in narrow  # the model cell wraps within its column, the mark stays with the name

    md = run("report", "1", "2", "3", "--format", "markdown").stdout
    assert f"> {NOTE}" in md
    assert f"| {TUNED} |" in md and f"| {LEAKY} |" in md

    rows_csv = {
        r["run_id"]: r
        for r in csv.DictReader(io.StringIO(run("report", "1", "2", "3", "--format", "csv").stdout))
    }
    assert [rows_csv[i]["adapter"] for i in ("1", "2", "3")] == ["", "city-lora", "leaky"]
    assert [rows_csv[i]["adapter_overlap"] for i in ("1", "2", "3")] == ["0", "0", "8"]
    assert rows_csv["2"]["adapter_sha256"] == "ab" * 32 and rows_csv["2"]["model"] == "simulated"
    assert json.loads(rows_csv["2"]["judge_options"])["adapter_sha256"] == "ab" * 32

    data = json.loads(run("report", "1", "2", "3", "--format", "json").stdout)
    by_id = {r["run_id"]: r for r in data["runs"]}
    assert (by_id[1]["adapter"], by_id[1]["adapter_sha256"], by_id[1]["adapter_overlap"]) == (None, None, 0)
    assert (by_id[2]["adapter"], by_id[2]["adapter_overlap"]) == ("city-lora", 0)
    assert (by_id[3]["adapter"], by_id[3]["adapter_overlap"]) == ("leaky", 8)
    assert NOTE in data["notes"]

    with runs() as s:
        report = build_report(s, [1, 2, 3])
    page = render_page(report, [])
    assert f"<td>{TUNED}</td>" in page and f"<td>{LEAKY}</td>" in page and html.escape(NOTE) in page
    # The figures name runs with run_label: the adapter and the mark are there too.
    assert f"· {TUNED} ·" in run_label(report.run(2)) and f"· {LEAKY} ·" in run_label(report.run(3))
    assert f"· {ZERO_SHOT} ·" in run_label(report.run(1))


def test_zero_shot_and_fine_tuned_runs_on_the_same_queries_are_compared(runs):
    data = json.loads(run("report", "1", "2", "--format", "json").stdout)
    assert [qs["run_ids"] for qs in data["query_sets"]] == [[1, 2]]  # one query set, one baseline
    assert len(data["baselines"]) == 1
    paired = [c for c in data["comparisons"] if c["against"] == "run 2"]
    assert [c["run_id"] for c in paired] == [1, 1, 1, 1] and all(c["n"] == 20 for c in paired)

    # Different samples: apart without --common, on their shared queries with it.
    apart = json.loads(run("report", "2", "4", "--format", "json").stdout)
    assert len(apart["query_sets"]) == 2 and not [c for c in apart["comparisons"] if c["against_run_id"]]
    common = json.loads(run("report", "2", "4", "--common", "--format", "json").stdout)
    assert [qs["run_ids"] for qs in common["query_sets"]] == [[2, 4]]
    shared = common["query_sets"][0]["n_queries"]
    assert 0 < shared < 12
    paired = [c for c in common["comparisons"] if c["against"] == "run 4"]
    assert [c["run_id"] for c in paired] == [2, 2, 2, 2] and all(c["n"] == shared for c in paired)
    assert {r["adapter"] for r in common["runs"]} == {"city-lora", None}
