"""Figures and the HTML page from typed report rows: what is drawn is what the report holds, every
text of every figure lies inside the figure for 1 to 12 runs, and the PNG shows it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from PIL import Image

from orchestrator.reporting import figures, stats
from orchestrator.reporting.build import ReportError
from orchestrator.reporting.figures import (
    RERANKED_COLOUR,
    TRUE_COLOUR,
    Example,
    TileImage,
    choose_examples,
    example_queries,
    example_title,
    figure3_scores,
    figure4_recall,
    figure5_examples,
    figure_calibration,
    figure_position_bias,
    load_image,
    save,
    score_panels,
    tiles_to_show,
)
from orchestrator.reporting.page import render_page
from orchestrator.reporting.render import run_label, table_blocks
from orchestrator.reporting.rows import (
    RECALL_KS,
    BaselineRow,
    CalibrationRow,
    ComparisonRow,
    CostRow,
    PositionBiasRow,
    QuerySet,
    Recall,
    Report,
    RunRow,
)

MODELS = ("llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-7B-Instruct", "OpenGVLab/InternVL2-8B")


def _recalls(values: Sequence[float], n: int = 500, confidence: float = 0.95) -> tuple[Recall, ...]:
    out = []
    for k, v in zip(RECALL_KS, values, strict=True):
        hits = round(v * n / 100)
        ci = stats.wilson(hits, n, confidence)
        out.append(Recall(k, hits, n, 100 * ci.estimate, 100 * ci.low, 100 * ci.high))
    return tuple(out)


def _run(run_id: int, strategy: str, query_set: str, k: int, confidence: float = 0.95) -> RunRow:
    prompt = "pairwise" if strategy != "pointwise" else ("yesno", "likert", "direct")[(run_id - 1) % 3]
    r1 = 40 + (run_id * 7) % 45
    return RunRow(
        run_id=run_id,
        candidate_set_id=1,
        candidates="sample4geo-vigor-cross-area-test-top20",
        query_set=query_set,
        k=k,
        strategy=strategy,
        prompt=prompt,
        judge="transformers",
        model=MODELS[run_id % len(MODELS)],
        status="done",
        n_planned=500,
        n_finished=500,
        n_queries=500,
        strategy_options={"window": 5, "step": 2, "passes": 1} if strategy == "sliding" else {"seed": run_id},
        judge_options={"batch_size": 64, "decode": "choices", "dtype": "bfloat16", "max_new_tokens": 1,
                       "attn_implementation": "sdpa", "revision": "a272c74b2481d8aff3aa6fc2c4bf891fe57334fb"},
        recall=_recalls([r1, min(99, r1 + 12), min(99.8, r1 + 20), 100 if run_id % 5 == 0 else min(99.8, r1 + 25)],
                        confidence=confidence),
    )  # fmt: skip


def _calibration(run: RunRow, seed: int) -> CalibrationRow:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, 400)
    outcomes = (rng.uniform(0, 1, 400) < probs**2).astype(int).tolist()
    rel = stats.reliability(probs.tolist(), outcomes)
    kind = "pointwise" if run.strategy == "pointwise" else "pairwise"
    return CalibrationRow(run.run_id, kind, rel.n, rel.ece, rel.bins, 0.83 if kind == "pointwise" else None)


def _position_bias(run: RunRow, seed: int) -> PositionBiasRow:
    rng = np.random.default_rng(seed)
    counts = []
    for first in range(1, run.k + 1):
        for second in range(1, run.k + 1):
            if first != second and rng.uniform() < 0.3:
                n = int(rng.integers(1, 40))
                counts.append(
                    stats.PairCount(first, second, first == 1, second == 1, n, int(rng.binomial(n, 0.7)))
                )
    share = {r: 0.6 * 0.5 ** (r - 1) for r in range(1, run.k + 1)}
    return PositionBiasRow(run.run_id, stats.position_bias(counts, share))


def make_report(n_runs: int, strategy: str | None = None, confidence: float = 0.95) -> Report:
    """``n_runs`` runs on two query sets (K=20 and, every third run, K=5), as ``build_report`` would
    give them; ``strategy`` None alternates pairwise, pointwise and sliding runs."""
    strategies = [strategy or ("pairwise", "pointwise", "sliding")[i % 3] for i in range(n_runs)]
    runs = [
        _run(i + 1, s, "Q1" if i < (n_runs + 1) // 2 else "Q2", 5 if i % 3 == 2 else 20, confidence)
        for i, s in enumerate(strategies)
    ]
    baselines = {
        (r.query_set, r.k): BaselineRow(1, r.candidates, r.query_set, r.k, 500,
                                        _recalls([38.0, 55.0, 63.0, 71.0 if r.k == 20 else 63.0]))
        for r in runs
    }  # fmt: skip
    query_sets = tuple(
        QuerySet(label, 1, runs[0].candidates, 500, tuple(r.run_id for r in runs if r.query_set == label))
        for label in dict.fromkeys(r.query_set for r in runs)
    )
    comparisons = tuple(
        ComparisonRow(r.run_id, "baseline", None, k, 500, 40, 12, 5.6, 1.2, 9.9, 0.0004, 0.012)
        for r in runs
        for k in RECALL_KS
    )
    costs = tuple(
        CostRow(
            r.run_id, 500, 52.25, 69, 26125, 2, 0, 1.5, "a272c74b2481d8aff3aa6fc2c4bf891fe57334fb", "f" * 64
        )
        for r in runs
    )
    return Report(
        confidence=confidence,
        common=False,
        query_sets=query_sets,
        baselines=tuple(baselines.values()),
        runs=tuple(runs),
        comparisons=comparisons,
        costs=costs,
        calibration=tuple(_calibration(r, i) for i, r in enumerate(runs)),
        position_bias=tuple(_position_bias(r, i) for i, r in enumerate(runs) if r.strategy != "pointwise"),
        retrieval=(),
        notes=(f"Recall@k (%) with {confidence:.0%} Wilson score intervals over queries <sic> & more.",),
    )


def _pointwise_rows(report: Report, n_queries: int = 30, n_candidates: int = 20) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for run in report.runs:
        low, high = stats.SCORE_RANGES[run.prompt]
        for q in range(n_queries):
            for c in range(n_candidates):
                score = float(rng.uniform(low, high))
                rows.append({"run_id": run.run_id, "query_id": q, "score": score, "positive": c == 0})
    return rows


def _png(fig: Figure, tmp_path, name="f.png") -> Image.Image:
    path = save(fig, tmp_path / name)
    img = Image.open(path)
    w, h = fig.get_size_inches() * figures.DPI
    assert img.format == "PNG"
    assert abs(img.size[0] - w) <= 1 and abs(img.size[1] - h) <= 1
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank canvas
    return img


# ----------------------------------------------------------------------------------------------
# layout: every text inside the figure, no text over another, legends clear of the axis labels


def _drawn_texts(fig: Figure, monkeypatch) -> list[tuple[Text, Bbox]]:
    """Each text artist the canvas actually draws (ticks out of view are not), with its extent."""
    drawn: list[tuple[Text, Bbox]] = []
    draw = Text.draw

    def recording(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self, self.get_window_extent(renderer)))

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", recording)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # constrained layout warns when it cannot fit the axes
            fig.canvas.draw()
    return drawn


def assert_laid_out(fig: Figure, monkeypatch, tolerance: float = 1.0) -> None:
    texts = _drawn_texts(fig, monkeypatch)
    assert texts
    page = fig.bbox.padded(tolerance)
    for text, box in texts:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (
            f"{text.get_text()!r} at {box.extents} leaves the figure {fig.bbox.extents}"
        )
    # No text over another (shrunk by the tolerance: touching is fine).
    shrunk = [(t, b.padded(-tolerance)) for t, b in texts]
    for i, (a, box_a) in enumerate(shrunk):
        for b, box_b in shrunk[i + 1 :]:
            assert not box_a.overlaps(box_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert fig.bbox.padded(tolerance).contains(box.x0, box.y0) and fig.bbox.padded(tolerance).contains(
            box.x1, box.y1
        )
        for ax in fig.axes:
            label = ax.xaxis.label
            if label.get_visible() and label.get_text():
                assert not box.overlaps(label.get_window_extent(renderer)), "legend over an x-axis label"
            if legend in fig.legends:
                assert not box.overlaps(ax.get_window_extent(renderer)), "figure legend over an axes"


FIGURES = {
    "figure4": lambda report: figure4_recall(report),
    "figure3": lambda report: figure3_scores(score_panels(report, _pointwise_rows(report, 6, 5))),
    "calibration": figure_calibration,
    "position_bias": figure_position_bias,
}
STRATEGY = {"figure4": None, "figure3": "pointwise", "calibration": None, "position_bias": "pairwise"}


@pytest.fixture(autouse=True)
def _low_dpi(monkeypatch):
    monkeypatch.setattr(figures, "DPI", 50)  # layout is in inches: a lower DPI only draws faster


@pytest.mark.parametrize("n_runs", range(1, 13))
@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_fits_its_text_for_1_to_12_runs(name, n_runs, monkeypatch):
    report = make_report(n_runs, STRATEGY[name])
    fig = FIGURES[name](report)
    assert_laid_out(fig, monkeypatch)


@pytest.mark.parametrize("n_examples", [1, 4])
def test_figure5_fits_its_text(n_examples, monkeypatch):
    long = "neither puts the true tile first (true tile: stage 1 #12, beyond K=5, not reranked)"
    examples = [
        Example(long, _pano(), [_tile(r) for r in range(1, 6)], [_tile(9, top1=True), _tile(12, positive=True)],
                note="huuRGp4wb80NTXGtb6kQfJ,41.8799226…")
        for _ in range(n_examples)
    ]  # fmt: skip
    fig = figure5_examples(examples, run_label(_run(3, "pairwise", "Q1", 20)))
    # Figure 5 has no legend: its suptitle explains the marks.
    texts = _drawn_texts(fig, monkeypatch)
    for text, box in texts:
        assert fig.bbox.padded(1).contains(box.x0, box.y0) and fig.bbox.padded(1).contains(box.x1, box.y1), (
            text.get_text()
        )


# ----------------------------------------------------------------------------------------------
# Figure 4


def test_figure4_rows_are_table1_with_their_intervals(tmp_path, monkeypatch):
    report = make_report(3, confidence=0.9)
    rows = list(report.table1_rows())
    fig = figure4_recall(report)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # Table 1's order from the top: baseline(s) of Q1, its runs, then Q2's; K and query set named.
    assert labels == [run_label(r) for r in rows]
    assert labels[0] == "baseline (stage 1) · K=20 · Q1"
    assert [t.get_position()[1] for t in ax.get_yticklabels()] == sorted(range(len(rows)), reverse=True)
    assert "run 3: sliding/pairwise · llava-1.5-7b-hf · K=5 · Q2" in [label.split("\n")[0] for label in labels]
    assert "window=5" in labels[-1]  # every option stored with the run, on the label's second line
    assert "baseline (stage 1) · K=5 · Q2" in labels
    assert "90% Wilson score interval" in ax.get_xlabel()
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [[p.get_width() for p in c.patches] for c in bars] == [
        [r.recall_at(k).value for r in rows] for k in RECALL_KS
    ]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"R@{k}" for k in RECALL_KS]
    errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = next(a for a in errors[0].lines[2] if isinstance(a, LineCollection)).get_segments()
    assert [(s[0][0], s[1][0]) for s in segments] == [
        pytest.approx((r.recall_at(1).low, r.recall_at(1).high)) for r in rows
    ]
    _png(fig, tmp_path)
    with pytest.raises(ValueError, match="Table 1"):
        figure4_recall(make_report(0))


def test_figure4_grows_with_its_labels_and_rows():
    few, many = figure4_recall(make_report(1)), figure4_recall(make_report(12))
    assert many.get_size_inches()[1] > few.get_size_inches()[1] + 5
    report = make_report(1)
    long_model = Report(**{**report.__dict__, "runs": (
        RunRow(**{**report.runs[0].__dict__, "model": "org/" + "a-very-long-model-name-" * 12}),
    )})  # fmt: skip
    assert figure4_recall(long_model).get_size_inches()[0] > few.get_size_inches()[0] + 2


# ----------------------------------------------------------------------------------------------
# Figure 3


def test_figure3_separation_is_within_query_not_pooled(tmp_path):
    report = make_report(1, "pointwise")
    run_id = report.runs[0].run_id
    # Query 1 scores everything high, query 2 low; within each query the positive is on top.
    scores = {1: (0.9, [0.8, 0.85, 0.7]), 2: (0.3, [0.2])}
    rows = [
        {"run_id": run_id, "query_id": q, "score": s, "positive": s == pos}
        for q, (pos, others) in scores.items()
        for s in (pos, *others)
    ]
    (panel,) = score_panels(report, rows)
    assert panel.separation == 1.0
    assert stats.auc(panel.positives, panel.others) == pytest.approx(5 / 8)  # pooled would say 0.62
    fig = figure3_scores([panel])
    ax = fig.axes[0]
    assert "within-query" in ax.get_title() and "= 1.00" in ax.get_title()
    assert ax.get_title().startswith(run_label(report.runs[0]).split("\n")[0])
    assert "2 positive and 4 other scores, 2 queries" in ax.get_title()
    assert ax.get_xlim() == (0.0, 1.0)  # yes/no scores: P(Yes) on [0, 1]
    # The other candidates as bars and the positives as a step line, both densities.
    (bars,) = ax.containers
    heights = np.array([p.get_height() for p in bars.patches])
    assert heights.sum() * bars.patches[0].get_width() == pytest.approx(1.0)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "other candidates of the query",
        "positive (the true tile)",
    ]
    _png(fig, tmp_path)
    with pytest.raises(ValueError, match="pointwise run"):
        figure3_scores([])


def test_figure3_scales_each_prompt_and_leaves_no_empty_panel():
    report = make_report(3, "pointwise")
    panels = score_panels(report, _pointwise_rows(report, 4, 3))
    assert [p.prompt for p in panels] == ["yesno", "likert", "direct"]
    fig = figure3_scores(panels)
    assert len(fig.axes) == 3  # a 2 x 2 grid, the fourth panel removed
    assert [ax.get_xlim() for ax in fig.axes] == [(0.0, 1.0), (1.0, 5.0), (0.0, 100.0)]


# ----------------------------------------------------------------------------------------------
# calibration and position bias


def test_calibration_draws_each_bin_with_its_interval(tmp_path):
    report = make_report(2)
    fig = figure_calibration(report)
    reliability, counts = fig.axes[0], fig.axes[1]
    row = report.calibration[0]
    title = reliability.get_title()
    assert title.startswith(run_label(report.runs[0]).split(" · ")[0])
    assert "P(first) against 'the first-shown tile is the better one'" in title.replace("\n", " ")
    assert f"ECE = {row.ece:.3f}" in title and f"n = {row.n:,} predictions" in title
    assert "'this tile is the positive'" in fig.axes[2].get_title().replace("\n", " ")
    (errorbar,) = [c for c in reliability.containers if isinstance(c, ErrorbarContainer)]
    line, _, (bars,) = errorbar.lines
    assert list(line.get_xdata()) == pytest.approx([b.mean_probability for b in row.bins])
    assert list(line.get_ydata()) == pytest.approx([b.frequency for b in row.bins])
    assert [(s[0][1], s[1][1]) for s in bars.get_segments()] == [
        pytest.approx((b.frequency_low, b.frequency_high)) for b in row.bins
    ]
    diagonal = reliability.lines[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    assert [p.get_height() for p in counts.patches] == [b.n for b in row.bins]
    assert "95% Wilson score interval" in fig.get_suptitle()
    _png(fig, tmp_path)
    with pytest.raises(ValueError):
        figure_calibration(make_report(0))


def test_position_bias_shows_points_with_intervals_and_no_lines(tmp_path):
    report = make_report(2, "pairwise", confidence=0.99)
    fig = figure_position_bias(report)
    left, right = fig.axes[0], fig.axes[1]
    bias = report.position_bias[0].bias
    title = left.get_title(loc="left")
    assert title.startswith(
        "run 1: pairwise/pairwise"
    ) and f"{bias.observed:.1%} of {bias.n:,}" in title.replace("\n", " ")
    (observed,) = [c for c in left.containers if isinstance(c, ErrorbarContainer)]
    points, _, (bars,) = observed.lines
    assert points.get_linestyle() == "None"  # sparse gaps: points, never joined
    assert list(points.get_xdata()) == [g.gap for g in bias.by_gap]
    assert [(s[0][1], s[1][1]) for s in bars.get_segments()] == [
        pytest.approx((g.low, g.high)) for g in bias.by_gap
    ]
    (expected,) = left.collections[-1:]
    assert [y for _, y in expected.get_offsets()] == pytest.approx([g.expected for g in bias.by_gap])
    assert all(line.get_linestyle() == "None" for line in left.lines if len(line.get_xdata()) > 2)
    first, second = (c for c in right.containers if isinstance(c, ErrorbarContainer))
    for container, share in ((first, bias.positive_first), (second, bias.positive_second)):
        point, _, (segment,) = container.lines
        assert point.get_ydata()[0] == pytest.approx(share.estimate)
        assert segment.get_segments()[0][:, 1] == pytest.approx([share.low, share.high])
    assert f"{bias.positive_first.estimate:.0%} of {bias.positive_first.n:,}" in [
        t.get_text() for t in right.texts
    ]
    assert "99% Wilson score interval" in fig.get_suptitle()
    _png(fig, tmp_path)


def test_position_bias_says_none_where_the_positive_was_never_shown_there():
    report = make_report(1, "pairwise")
    row = report.position_bias[0]
    empty = stats.wilson(0, 0)
    no_second = PositionBiasRow(
        row.run_id, stats.PositionBias(**{**row.bias.__dict__, "positive_second": empty})
    )
    fig = figure_position_bias(Report(**{**report.__dict__, "position_bias": (no_second,)}))
    assert "none" in [t.get_text() for t in fig.axes[1].texts]
    with pytest.raises(ValueError):
        figure_position_bias(make_report(2, "pointwise"))


# ----------------------------------------------------------------------------------------------
# Figure 5


def _tile(rank, positive=False, top1=False, colour=(120, 120, 120)):
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:] = colour
    img[10:20, 10:30] = (240, 240, 240)
    return TileImage(rank, img, positive, top1)


def _pano():
    pano = np.zeros((40, 80, 3), dtype=np.uint8)
    pano[:15] = (150, 185, 225)
    return pano


def _candidate(rank, positive=False, top1=False):
    return {"query_id": 7, "stage1_rank": rank, "path": f"t{rank}.png", "positive": int(positive),
            "reranked_top1": int(top1)}  # fmt: skip


def test_tiles_to_show_keeps_the_true_tile_beyond_the_top_5():
    # As the SQL returns them: the first 5, the reranker's top-1 at 9 and the positive at 12.
    rows = [_candidate(12, positive=True), *(_candidate(r) for r in range(1, 6)), _candidate(9, top1=True)]
    shown, extras = tiles_to_show(rows)
    assert [t["stage1_rank"] for t in shown] == [1, 2, 3, 4, 5]
    assert [(t["stage1_rank"], t["positive"], t["reranked_top1"]) for t in extras] == [(9, 0, 1), (12, 1, 0)]
    # One tile both the positive and the top-1: shown once.
    shown, extras = tiles_to_show(
        [*(_candidate(r) for r in range(1, 6)), _candidate(30, positive=True, top1=True)]
    )
    assert [t["stage1_rank"] for t in extras] == [30]
    # Both within the top 5: nothing after them.
    rows = [_candidate(r, positive=r == 2, top1=r == 4) for r in range(1, 6)]
    assert tiles_to_show(rows) == (rows, [])


def test_example_titles_say_where_the_true_tile_was():
    assert example_title("missed", None, None, 20) == (
        "neither puts the true tile first (true tile not retrieved by stage 1)"
    )
    assert example_title("missed", 12, None, 5) == (
        "neither puts the true tile first (true tile: stage 1 #12, beyond K=5, not reranked)"
    )
    assert (
        example_title("fixed", 3, 1, 20)
        == "reranking found the true tile (true tile: stage 1 #3, reranked #1)"
    )


def test_figure5_marks_the_true_tile_and_outlines_the_rerankers_choice(tmp_path):
    examples = [
        Example(
            "fixed", _pano(), [_tile(1), _tile(2), _tile(3, positive=True, top1=True), _tile(4), _tile(5)]
        ),
        Example(
            "missed",
            _pano(),
            [_tile(1), _tile(2), _tile(3), _tile(4), _tile(5)],
            extras=[_tile(9, top1=True), _tile(12, positive=True)],
            note="query.jpg",
        ),
    ]
    fig = figure5_examples(examples, "run 1")
    axes = fig.axes
    # Row 1: panorama and five tiles; row 2 adds the top-1 and the true tile from beyond the top 5.
    assert len(axes) == 6 + 8
    titles = [ax.get_title() for ax in axes]
    assert titles[3] == "#3 true" and titles[12] == "#9" and titles[13] == "#12 true"
    assert axes[6].get_title(loc="left") == "missed\nquery.jpg"
    assert axes[12].get_xlabel() == "reranker's top-1" and axes[13].get_xlabel() == "true tile"
    outlined = [i for i, ax in enumerate(axes) if ax.spines["top"].get_linewidth() == 4.0]
    assert outlined == [3, 12]
    assert all(to_hex(axes[i].spines["top"].get_edgecolor()) == RERANKED_COLOUR for i in outlined)
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
    assert dashed == [3, 13]
    # In the PNG, the outline around the reranker's top-1 is blue.
    img = np.asarray(_png(fig, tmp_path).convert("RGB"))
    fig.canvas.draw()
    box = axes[3].get_window_extent()
    x = int(box.x0 + box.width / 2)
    y = int(img.shape[0] - box.y1) + 1  # on the top spine
    r, g, b = img[y, x]
    assert b > 150 and r < 100, (r, g, b)
    with pytest.raises(ValueError):
        figure5_examples([], "run 1")


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


def test_example_queries_by_name_or_chosen():
    outcomes = [
        {"query_id": 1, "query": "a.jpg", "stage1_rank": 3, "final_rank": 1},
        {"query_id": 2, "query": "b.jpg", "stage1_rank": None, "final_rank": None},
    ]
    named = example_queries(outcomes, 4, 2, ["b.jpg", "a.jpg", "b.jpg"], seed=0)
    assert [(o["query_id"], kind) for o, kind in named] == [(2, "missed"), (1, "fixed")]
    assert [(o["query_id"], kind) for o, kind in example_queries(outcomes, 4, 2, [], seed=0)] == [
        (1, "fixed"),
        (2, "missed"),
    ]
    with pytest.raises(ReportError, match="run 4 has no finished query named 'nope.jpg'"):
        example_queries(outcomes, 4, 2, ["a.jpg", "nope.jpg"], seed=0)


def test_load_image_reads_and_shrinks_and_survives_a_missing_file(tmp_path):
    Image.new("RGB", (2048, 1024), (10, 200, 30)).save(tmp_path / "pano.jpg")
    arr = load_image(tmp_path / "pano.jpg")
    assert arr.shape == (256, 512, 3)
    assert tuple(arr[5, 5]) == pytest.approx((10, 200, 30), abs=3)
    missing = load_image(tmp_path / "nope.png")
    assert missing.shape == (64, 64, 3) and missing.std() > 0


# ----------------------------------------------------------------------------------------------
# the page


def test_page_holds_the_header_tables_and_figures_escaped(tmp_path):
    report = make_report(3)
    page = render_page(report, [(tmp_path / "figure4_recall.png", "Figure 4 <caption>")])
    assert page.startswith("<!doctype html>")
    assert "<title>cvgl-rerank report: runs 1, 2, 3</title>" in page
    assert "<script" not in page and "<link" not in page  # self-contained
    assert '<img src="figure4_recall.png" alt="Figure 4 &lt;caption&gt;">' in page
    assert "intervals over queries &lt;sic&gt; &amp; more" in page and "Figure 4 &lt;caption&gt;" in page
    assert "query sets: Q1 = 500 queries of &#x27;sample4geo" in page
    blocks = table_blocks(report)
    # One scrolling box per table, the caption outside it.
    assert page.count('<div class="scroll"><table>') == page.count("<table>") == len(blocks)
    table1 = blocks[0]
    for r, c in table1.bold:
        assert f'<td class="num"><strong>{table1.body[r][c]}</strong></td>' in page
    assert '<th class="num">R@1</th>' in page
    # The judge options wrap instead of widening the settings table.
    assert '<td class="long">attn_implementation=sdpa' in page
