"""The report's text table: within 120 columns by default, every column on one line with --wide."""

from __future__ import annotations

import dataclasses
import re

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.reporting.render import NARROW_FOOTNOTE, TABLE_WIDTH, format_report, table_blocks
from orchestrator.reporting.rows import Report, RetrievalRow
from tests.unit.test_figures import make_report

LONG_JUDGE_OPTIONS = {
    "model_path": "/srv/checkpoints/llava-hf/llava-1.5-7b-hf-finetuned-on-vigor-cross-area-epoch-12",
    "poison": ["panorama_0001.jpg|satellite_0001.png|satellite_0002.png"] * 3,
    "revision": "a272c74b2481d8aff3aa6fc2c4bf891fe57334fb",
    "attn_implementation": "sdpa",
    "batch_size": 64,
}


def long_report(n_runs: int) -> Report:
    """``n_runs`` runs (two query sets, K=20 and 5) with long option values, model names and
    candidate-set names, and a retrieval row: every block of the table."""
    report = make_report(n_runs)
    runs = tuple(
        dataclasses.replace(
            r,
            model=f"organisation-with-a-long-name/{r.model.rsplit('/', 1)[-1]}-instruct-finetuned",
            strategy="tournament",
            prompt="pairwise-with-reasoning",
            strategy_options={"top": 5, "both_orders": True, "aggregate": "bradley-terry"},
            judge_options={**r.judge_options, **LONG_JUDGE_OPTIONS},
        )
        for r in report.runs
    )
    retrieval = RetrievalRow(
        retrieval_run_id=1, name="s4g", candidate_set_id=1, candidates="sample4geo-vigor-cross-area-test-top20",
        model="convnext_base.fb_in22k_ft_in1k_384-sample4geo-vigor-cross-area", random_init=False,
        status="done", gallery=90618, one_percent_k=906, n_queries=21143,
        recall={"recall@1": 61.72, "recall@3": 80.0, "recall@5": 85.01, "recall@10": 90.5, "recall@1%": 99.14},
        hit_rate=69.5, skipped_images=0, skipped_tiles=0, skipped_queries=0,
    )  # fmt: skip
    return dataclasses.replace(report, runs=runs, retrieval=(retrieval,))


def _one_line(cells: list[str]) -> re.Pattern[str]:
    """A table line holding exactly these cells, in order, as columns (two or more spaces apart)."""
    return re.compile(r"^\s*" + r"\s{2,}".join(map(re.escape, cells)) + r"\s*$", re.MULTILINE)


@pytest.mark.parametrize("n_runs", [1, 2, 5, 12])
def test_the_default_table_fits_120_columns_and_wide_holds_every_column(n_runs):
    report = long_report(n_runs)
    narrow, wide = format_report(report, "table"), format_report(report, "table", wide=True)
    blocks = table_blocks(report)
    assert len(blocks) == 7  # Table 1, differences, settings, calibration, bias, cost, retrieval

    too_long = [line for line in narrow.splitlines() if len(line) > TABLE_WIDTH]
    assert too_long == []
    assert narrow.splitlines()[-1] == NARROW_FOOTNOTE and "--wide for all columns" in NARROW_FOOTNOTE
    # Nothing is lost: every word of every note, caption, header and cell is still there.
    flat = " ".join(narrow.split())
    for block in blocks:
        assert " ".join(block.caption.split()) in flat
    lines = narrow.splitlines()
    for run in report.runs:
        for recall in run.recall:
            # Table 1's intervals sit on the line below their values, aligned on the right.
            value, interval = f"{recall.value:.1f}", f"[{recall.low:.1f}, {recall.high:.1f}]"
            assert value + " [" not in narrow
            assert any(
                m.end() in {i.end() for i in re.finditer(re.escape(interval), below)}
                for above, below in zip(lines, lines[1:], strict=False)
                for m in re.finditer(re.escape(value), above)
            ), (value, interval)
    # Long text cells wrap rather than widen the table: the option values are there, in pieces.
    assert "".join(narrow.split()).count("".join(LONG_JUDGE_OPTIONS["model_path"].split())) == n_runs

    assert max(map(len, wide.splitlines())) > TABLE_WIDTH  # the same report, with nothing wrapped
    assert NARROW_FOOTNOTE not in wide
    for block in blocks:
        assert block.caption in wide.splitlines()
        for cells in [block.headers, *block.body]:
            assert _one_line(cells).search(wide), cells


def test_report_help_names_the_default_and_the_wide_view():
    out = CliRunner().invoke(cli, ["report", "--help"], terminal_width=100)
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "No RUN_IDS: every run and candidate set stored." in text
    assert "--wide" in text and "fit 120 columns" in text and "table1.txt as with --wide" in text
