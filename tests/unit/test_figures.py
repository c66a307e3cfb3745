"""Figures from plain records: what is drawn is what was given, and the PNG shows it."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.patches import Rectangle
from PIL import Image

from orchestrator import figures
from orchestrator.figures import (
    RERANKED_COLOUR,
    TRUE_COLOUR,
    BiasPanel,
    Example,
    ScorePanel,
    TileImage,
    choose_examples,
    figure3_scores,
    figure4_recall,
    figure5_examples,
    figure_position_bias,
    load_image,
    position_bias_panel,
    save,
)
from orchestrator.report import Report
from orchestrator.report_page import render_page
from orchestrator.stats import PairCount


def _png(fig, tmp_path, name="f.png") -> Image.Image:
    path = save(fig, tmp_path / name)
    img = Image.open(path)
    w, h = fig.get_size_inches() * figures.DPI
    assert img.format == "PNG"
    assert abs(img.size[0] - w) <= 1 and abs(img.size[1] - h) <= 1
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank canvas
    return img


def _row(run_id, strategy, r1, r3, r5, r10, width=4.0, candidates="s4g"):
    row = {
        "run_id": run_id,
        "candidates": candidates,
        "strategy": strategy,
        "prompt": None if strategy == "baseline" else "pairwise",
        "judge": "simulated",
        "model": "llava-hf/llava-1.5-7b-hf",
        "n_queries": 500,
    }
    for k, v in zip((1, 3, 5, 10), (r1, r3, r5, r10), strict=True):
        row[f"recall@{k}"] = v
        row[f"recall@{k}_ci_low"] = v - width
        row[f"recall@{k}_ci_high"] = v + width / 2
    return row


def test_figure3_draws_each_runs_scores_as_densities(tmp_path):
    rng = np.random.default_rng(0)
    panels = [
        ScorePanel(
            "yes/no run", "yesno", rng.uniform(0.5, 1, 40).tolist(), rng.uniform(0, 0.5, 400).tolist()
        ),
        ScorePanel("likert run", "likert", [4.0, 4.5, 5.0], [1.0, 2.0, 2.5, 4.5]),
        ScorePanel("custom", "other", [7.0, 8.0], [1.0, 2.0]),
    ]
    fig = figure3_scores(panels)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    yesno, likert, custom = visible
    assert "yes/no run" in yesno.get_title() and "= 1.00" in yesno.get_title()  # fully separated
    assert likert.get_xlim() == (1.0, 5.0) and yesno.get_xlim() == (0.0, 1.0)
    assert custom.get_xlim() == (1.0, 8.0)  # unknown prompt: the data's range
    for ax, panel in zip(visible, panels, strict=True):
        # The other candidates as bars and the positives as a step line, both densities.
        (bars,) = ax.containers
        heights = np.array([p.get_height() for p in bars.patches])
        assert heights.sum() * bars.patches[0].get_width() == pytest.approx(1.0)
        lo, hi = ax.get_xlim()
        expected, _ = np.histogram(panel.positives, bins=np.linspace(lo, hi, 26), density=True)
        step = [p for p in ax.patches if not isinstance(p, Rectangle)]
        assert len(step) == 1
        assert step[0].get_xy()[:, 1].max() == pytest.approx(expected.max())
    legend = [t.get_text() for t in yesno.get_legend().get_texts()]
    assert legend == ["other candidates (n=400)", "positive (n=40)"]
    _png(fig, tmp_path)
    with pytest.raises(ValueError, match="pointwise run"):
        figure3_scores([])


def test_figure4_bars_are_the_recalls_with_their_intervals(tmp_path):
    rows = [
        _row(None, "baseline", 61.2, 73.8, 82.4, 88.0),
        _row(1, "pairwise", 64.8, 84.8, 89.8, 91.0),
        _row(2, "pointwise", 15.2, 33.4, 46.0, 60.0),
    ]
    fig = figure4_recall(rows)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # Sorted by R@1, drawn bottom-up: the best method is the top label.
    assert labels[-1].startswith("pairwise/pairwise · llava-1.5-7b-hf (run 1)")
    assert labels[0].startswith("pointwise")
    assert labels[1] == "baseline (stage 1)"
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["R@1", "R@3", "R@5", "R@10"]
    assert [p.get_width() for p in bars[0].patches] == [15.2, 61.2, 64.8]
    errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = next(a for a in errors[0].lines[2] if isinstance(a, LineCollection)).get_segments()
    assert [(round(s[0][0], 6), round(s[1][0], 6)) for s in segments] == [
        (11.2, 17.2),
        (57.2, 63.2),
        (60.8, 66.8),
    ]
    _png(fig, tmp_path)
    with pytest.raises(ValueError):
        figure4_recall([])


def test_figure4_names_candidate_sets_when_there_are_several():
    rows = [
        _row(None, "baseline", 61.2, 73.8, 82.4, 88.0),
        _row(None, "baseline", 50, 60, 70, 80, candidates="b"),
    ]
    labels = [t.get_text() for t in figure4_recall(rows).axes[0].get_yticklabels()]
    assert labels == ["baseline (stage 1) · b", "baseline (stage 1) · s4g"]


def _tile(rank, positive=False, top1=False, colour=(120, 120, 120)):
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:] = colour
    img[10:20, 10:30] = (240, 240, 240)
    return TileImage(rank, img, positive, top1)


def test_figure5_marks_the_true_tile_and_outlines_the_rerankers_choice(tmp_path):
    pano = np.zeros((40, 80, 3), dtype=np.uint8)
    pano[:15] = (150, 185, 225)
    examples = [
        Example("fixed", pano, [_tile(1), _tile(2), _tile(3, positive=True, top1=True), _tile(4), _tile(5)]),
        Example(
            "broken",
            pano,
            [_tile(1, positive=True), _tile(2), _tile(3), _tile(4), _tile(5)],
            extra=_tile(9, top1=True),
            note="query.jpg",
        ),
    ]
    fig = figure5_examples(examples, "run 1")
    axes = fig.axes
    # Row 1: panorama and five tiles; row 2 adds the reranker's top-1 from beyond the top 5.
    assert len(axes) == 6 + 7
    titles = [ax.get_title() for ax in axes]
    assert titles[3] == "#3 true" and titles[7] == "#1 true" and titles[12] == "#9"
    assert axes[6].get_title(loc="left") == "broken\nquery.jpg"
    outlined = [i for i, ax in enumerate(axes) if ax.spines["top"].get_linewidth() == 4.0]
    assert outlined == [3, 12]
    for i in outlined:
        assert ax_colour(axes[i]) == RERANKED_COLOUR
    dashed = [
        i
        for i, ax in enumerate(axes)
        if any(
            isinstance(p, Rectangle)
            and p.get_linestyle() == "--"
            and to_hex(p.get_edgecolor()) == TRUE_COLOUR
            for p in ax.patches
        )
    ]
    assert dashed == [3, 7]
    assert "reranker's top-1" in axes[12].get_xlabel()
    # In the PNG, the outline around the reranker's top-1 is blue.
    img = np.asarray(_png(fig, tmp_path).convert("RGB"))
    fig.canvas.draw()
    box = axes[3].get_window_extent()
    height = img.shape[0]
    x = int(box.x0 + box.width / 2)
    y = int(height - box.y1) + 1  # on the top spine
    r, g, b = img[y, x]
    assert b > 150 and r < 100, (r, g, b)
    with pytest.raises(ValueError):
        figure5_examples([], "run 1")


def ax_colour(ax) -> str:
    return to_hex(ax.spines["top"].get_edgecolor())


def test_choose_examples_round_robin_and_seeded():
    outcomes = [
        {"query_id": 1, "stage1_rank": 3, "final_rank": 1},  # fixed
        {"query_id": 2, "stage1_rank": 1, "final_rank": 2},  # broken
        {"query_id": 3, "stage1_rank": 1, "final_rank": 1},  # kept
        {"query_id": 4, "stage1_rank": None, "final_rank": None},  # missed
        {"query_id": 5, "stage1_rank": 4, "final_rank": 1},  # fixed
        {"query_id": 6, "stage1_rank": 2, "final_rank": 1},  # fixed
    ]
    chosen = choose_examples(outcomes, 5, seed=0)
    assert [kind for _, kind in chosen] == ["fixed", "broken", "kept", "missed", "fixed"]
    assert {q for q, _ in chosen[:4]} >= {2, 3, 4}
    assert chosen == choose_examples(outcomes, 5, seed=0)
    picks = {tuple(choose_examples(outcomes, 1, seed=s)) for s in range(20)}
    assert len(picks) > 1  # the seed chooses among the fixed queries
    assert len(choose_examples(outcomes, 50)) == 6


def test_position_bias_figure_shows_the_rates(tmp_path):
    share = {1: 0.6, 2: 0.1, 3: 0.1}
    counts = [PairCount(1, 2, True, False, 30, 27), PairCount(2, 3, False, True, 10, 8)]
    panel = position_bias_panel("run 7", counts, share)
    assert panel.positive_first.estimate == pytest.approx(0.9)
    assert panel.positive_second.estimate == pytest.approx(0.2)
    fig = figure_position_bias([panel, BiasPanel("run 8", panel.bias)])
    left, right = fig.axes[0], fig.axes[1]
    title = left.get_title(loc="left")
    assert title.startswith("run 7") and "87.5% of 40" in title
    heights = [p.get_height() for p in right.patches]
    assert heights == [pytest.approx(0.9), pytest.approx(0.2)]
    # The second panel has no intervals to draw: it says so instead of drawing bars.
    assert [t.get_text() for t in fig.axes[3].texts] == ["none", "none"]
    _png(fig, tmp_path)
    with pytest.raises(ValueError):
        figure_position_bias([])


def test_load_image_reads_and_shrinks_and_survives_a_missing_file(tmp_path):
    Image.new("RGB", (2048, 1024), (10, 200, 30)).save(tmp_path / "pano.jpg")
    arr = load_image(tmp_path / "pano.jpg")
    assert arr.shape == (256, 512, 3)
    assert tuple(arr[5, 5]) == pytest.approx((10, 200, 30), abs=3)
    missing = load_image(tmp_path / "nope.png")
    assert missing.shape == (64, 64, 3) and missing.std() > 0


def test_page_holds_the_tables_notes_and_figures(tmp_path):
    rows = [_row(None, "baseline", 61.2, 73.8, 82.4, 88.0), _row(3, "pairwise", 64.8, 84.8, 80.0, 91.0)]
    rows[1].update(
        {
            "mcnemar_p": 0.04,
            "top1_fixed": 30,
            "top1_broken": 12,
            **{f"delta@{k}": 1.0 for k in (1, 3, 5, 10)},
            **{f"delta@{k}_ci_low": -1.0 for k in (1, 3, 5, 10)},
            **{f"delta@{k}_ci_high": 3.0 for k in (1, 3, 5, 10)},
            **{f"delta@{k}_p": 0.2 for k in (1, 3, 5, 10)},
        }
    )
    report = Report(rows, ["a <note> & more"])
    page = render_page(report, [(tmp_path / "figure4_recall.png", "Figure 4 <caption>")], [3])
    assert page.startswith("<!doctype html>")
    assert "<title>cvgl-rerank report: runs 3</title>" in page
    assert '<img src="figure4_recall.png"' in page
    assert "a &lt;note&gt; &amp; more" in page and "Figure 4 &lt;caption&gt;" in page
    assert "<strong>64.80 [60.8, 66.8]</strong>" in page  # best R@1 in bold
    assert "<strong>82.40 [78.4, 84.4]</strong>" in page  # best R@5 is the baseline's
    assert "McNemar p" in page and "0.040" in page
    assert page.count("<table>") == 2  # no cost columns in these rows: no cost table


def _tested_row():
    row = _row(3, "pairwise", 64.8, 84.8, 80.0, 91.0)
    row.update(
        n_finished=500,
        top1_fixed=30,
        top1_broken=12,
        mcnemar_p=0.0004,
        judgments_per_query_mean=52.25,
        judgments_per_query_max=69,
        failed_judgments=2,
        reused_judgments=0,
        gpu_seconds_per_query=1.5,
        model_revision="abc123",
        prompt_sha256="f" * 64,
        **{f"delta@{k}": 3.6 for k in (1, 3, 5, 10)},
        **{f"delta@{k}_ci_low": 0.8 for k in (1, 3, 5, 10)},
        **{f"delta@{k}_ci_high": 6.4 for k in (1, 3, 5, 10)},
        **{f"delta@{k}_p": 0.012 for k in (1, 3, 5, 10)},
    )
    return row


def test_table_markdown_and_csv_render_the_statistics():
    from orchestrator.report import format_rows

    rows = [_row(None, "baseline", 61.2, 73.8, 82.4, 88.0), _tested_row()]
    table = format_rows(rows, "table", ["a note"])
    assert table.startswith("Table 1. Recall@k (%) [confidence interval]")
    assert "64.80 [60.8, 66.8]" in table
    assert "+3.60 [+0.8, +6.4] p=0.012" in table and "<0.001" in table
    assert "52.2   69" in table and "1.500" in table
    assert "  ffffffffffff\n" in table and "f" * 13 not in table  # the prompt hash, shortened
    assert table.rstrip().endswith("note: a note")
    md = format_rows(rows, "markdown", ["a note"])
    assert "| 3 | s4g | pairwise/pairwise | simulated |" in md
    assert "**64.80 [60.8, 66.8]**" in md and "**82.40 [78.4, 84.4]**" in md
    assert md.rstrip().endswith("- a note")
    lines = format_rows(rows, "csv").splitlines()
    header = lines[0].split(",")
    assert header[:7] == ["run_id", "candidates", "strategy", "prompt", "judge", "model", "n_queries"]
    values = dict(zip(header, lines[2].split(","), strict=True))
    assert values["mcnemar_p"] == "0.0004" and values["recall@1_ci_low"] == "60.8"
    assert values["prompt_sha256"] == "f" * 64
    with pytest.raises(ValueError, match="unknown format"):
        format_rows(rows, "xml")
