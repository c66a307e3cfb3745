"""The paper's figures as PNG files, drawn from a ``Report`` and what the database stores.

- Figure 3: pointwise score distributions per run, for the positive tile and for the rest, with
  the within-query separation (the paper's evidence that pointwise scores do not find the match).
- Figure 4: Recall@1/3/5/10 per row of Table 1 (baselines and runs) with their intervals.
- Calibration: a reliability diagram per run that stored probabilities.
- Position bias (pairwise runs): how often the first-shown tile wins per rank gap, against the rate
  stage-1 ranks alone predict, and how often the positive wins when shown first versus second.
- Training curves (``training-<adapter>.png``): per fine-tuned adapter, the training loss per step
  with its running mean, and the validation pairwise accuracy against chance (0.5).
- Figure 5: qualitative examples: the panorama, the top-5 tiles in stage-1 order, the true tile
  marked (green, dashed) and the reranker's top-1 outlined (blue, as in the paper); either one
  from beyond the top 5 is shown after them with its stage-1 rank.

Every size is computed from the text the figure holds (labels, titles) and its number of panels,
so any number of runs fits. The plotting functions return a matplotlib ``Figure`` (object API on
the Agg canvas: no pyplot state); ``write_figures`` reads the SQL in
``db/reports.py`` and writes the files plus ``index.html``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.textpath import TextToPath
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sqlalchemy.orm import Session

from db import adapters as adapters_store
from db import reports
from orchestrator.reporting import stats
from orchestrator.reporting.build import ReportError
from orchestrator.reporting.render import run_label
from orchestrator.reporting.rows import INTERVAL_METHOD, RECALL_KS, Report

DPI = 120
TRUE_COLOUR = "#1a9641"  # the true tile, positives
RERANKED_COLOUR = "#1f4fd1"  # the reranker's top-1 (the paper outlines it in blue)
OTHER_COLOUR = "#8c8c8c"
EXPECTED_COLOUR = "#e66101"  # what stage-1 ranks alone predict
RECALL_COLOURS = {1: "#1f4fd1", 3: "#4f8fdc", 5: "#92bde8", 10: "#cfe2f5"}
# Score axis label per pointwise prompt; its range is the prompt's scale (stats.SCORE_RANGES).
SCORE_LABELS = {
    "yesno": "P(Yes)",
    "reason": "P(Yes) after reasoning",
    "likert": "Likert expectation (1-5)",
    "direct": "direct score (0-100)",
}
CALIBRATION_TARGETS = {
    "pointwise": "pointwise: score against 'this tile is the positive'",
    "pairwise": "pairwise: P(first) against 'the first-shown tile is the better one'",
}
TILES_SHOWN = 5
THUMBNAIL = (512, 512)  # VIGOR panoramas are 2048 x 1024: shrink before drawing
# Font sizes (points).
SUPTITLE = 10.0
TITLE = 8.5
LABEL = 8.5
TICK = 8.0
LINE = 1.45 / 72  # inches per point of font size of one line of text, with its leading


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def interval_name(report: Report) -> str:
    """The level and method of every error bar of the figures, e.g. "95% Wilson score interval"."""
    return f"{report.confidence:.0%} {INTERVAL_METHOD} interval"


_TEXT_TO_PATH = TextToPath()


@lru_cache(maxsize=4096)
def text_inches(text: str, size: float) -> float:
    """Width in inches of the widest line of ``text`` at ``size`` points, in the default font."""
    prop = FontProperties(size=size)
    widths = (
        _TEXT_TO_PATH.get_text_width_height_descent(line, prop, ismath=False)[0] for line in text.split("\n")
    )
    return max(widths) / 72


def fit_lines(text: str, width: float, size: float) -> str:
    """``text`` broken at spaces so that no line is wider than ``width`` inches at ``size`` points
    (a single word wider than that keeps its own line)."""
    out = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            longer = f"{line} {word}" if line else word
            if line and text_inches(longer, size) > width:
                out.append(line)
                line = word
            else:
                line = longer
        out.append(line)
    return "\n".join(out)


def lines_height(text: str, size: float) -> float:
    return (text.count("\n") + 1) * size * LINE


def _figure_legend(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for every panel, below everything in the layout (never over an axis label), in
    as many columns as the figure's width holds (never cut at the edge)."""
    # An entry: its handle (2 em), the gap to its text (0.8 em), the text, the column gap (2 em).
    entry = max(text_inches(label, TICK) for label in labels) + 4.8 * TICK / 72
    ncols = max(1, min(len(labels), int((fig.get_figwidth() - 0.3) // entry)))
    rows = -(-len(labels) // ncols)
    fig.set_figheight(fig.get_figheight() + (rows - 1) * TICK * LINE)  # the panels keep their height
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=TICK, frameon=False)


# ----------------------------------------------------------------------------------------------
# Figure 3


@dataclass(frozen=True)
class ScorePanel:
    """One pointwise run's scores per query, split by whether the tile is the query's positive."""

    label: str
    prompt: str
    by_query: Mapping[int, tuple[Sequence[float], Sequence[float]]]  # query id -> (positive's, others')

    @property
    def positives(self) -> list[float]:
        return [v for pos, _ in self.by_query.values() for v in pos]

    @property
    def others(self) -> list[float]:
        return [v for _, other in self.by_query.values() for v in other]

    @property
    def separation(self) -> float | None:
        """Mean over queries of P(the positive scores above another candidate of its query)."""
        return stats.within_query_auc(self.by_query.values())


def score_panels(report: Report, rows: Sequence[Mapping[str, Any]]) -> list[ScorePanel]:
    """Panels of the report's runs from ``reports.pointwise_scores`` rows, in the report's order."""
    by_run: dict[int, dict[int, tuple[list[float], list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: ([], []))
    )
    for r in rows:
        by_run[r["run_id"]][r["query_id"]][0 if r["positive"] else 1].append(float(r["score"]))
    return [
        ScorePanel(run_label(run), run.prompt, dict(by_run[run.run_id]))
        for run in report.runs
        if run.run_id in by_run
    ]


def figure3_scores(panels: Sequence[ScorePanel]) -> Figure:
    """Histograms (density) of positives' and other candidates' scores, one panel per run."""
    if not panels:
        raise ValueError("Figure 3 needs at least one pointwise run with stored scores")
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    panel_width = 4.6
    titles = [fit_lines(_score_title(p), panel_width, TITLE) for p in panels]
    title_height = max(lines_height(t, TITLE) for t in titles)
    width = 0.3 + ncols * (panel_width + 0.7)
    suptitle = fit_lines(
        "Figure 3. Pointwise scores of the positive tile and of the other candidates", width - 0.3, SUPTITLE
    )
    fig = new_figure(width, 0.8 + lines_height(suptitle, SUPTITLE) + nrows * (2.4 + title_height))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel, title in zip(axes, panels, titles, strict=False):
        lo, hi = stats.SCORE_RANGES.get(panel.prompt, (None, None))
        xlabel = SCORE_LABELS.get(panel.prompt, "score")
        if lo is None:
            values = [*panel.positives, *panel.others]
            lo, hi = float(min(values)), float(max(values))
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 26)
        ax.hist(panel.others, bins=bins, density=True, color=OTHER_COLOUR, alpha=0.55)
        ax.hist(panel.positives, bins=bins, density=True, histtype="step", linewidth=2.0, color=TRUE_COLOUR)
        ax.set_title(title, fontsize=TITLE)
        ax.set_xlabel(xlabel, fontsize=LABEL)
        ax.set_ylabel("density", fontsize=LABEL)
        ax.tick_params(labelsize=TICK)
        ax.set_xlim(lo, hi)
    for ax in axes[len(panels) :]:
        fig.delaxes(ax)
    _figure_legend(
        fig,
        [Patch(color=OTHER_COLOUR, alpha=0.55), Line2D([], [], color=TRUE_COLOUR, linewidth=2.0)],
        ["other candidates of the query", "positive (the true tile)"],
    )
    fig.suptitle(suptitle, fontsize=SUPTITLE)
    return fig


def _score_title(panel: ScorePanel) -> str:
    separation = panel.separation
    within = (
        "no query has both a positive and another candidate scored"
        if separation is None
        else f"P(positive scores above another candidate of its query) = {separation:.2f}"
    )
    return (
        f"{panel.label}\nwithin-query separation: {within}\n"
        f"{len(panel.positives):,} positive and {len(panel.others):,} other scores, {len(panel.by_query):,} queries"
    )


# ----------------------------------------------------------------------------------------------
# Figure 4


def figure4_recall(report: Report, ks: Sequence[int] = RECALL_KS) -> Figure:
    """Grouped horizontal bars of R@k per row of Table 1 (in its order, top down) with intervals."""
    rows = list(report.table1_rows())
    if not rows:
        raise ValueError("Figure 4 needs at least one row of Table 1")
    labels = [run_label(r) for r in rows]
    label_width = max(text_inches(label, TICK) for label in labels)
    title = "Figure 4. Recall@k per row of Table 1; a baseline is stage 1 on its query set, cut at its K"
    xlabel = f"Recall@k (%); error bars: {interval_name(report)} over the row's queries"
    plot_width = max(5.0, text_inches(xlabel, LABEL) + 0.2)  # the x-label is centred under the plot
    width = max(label_width + plot_width + 0.7, text_inches(title, SUPTITLE) + 0.4)
    row_height = 0.62  # room for one value label per bar
    fig = new_figure(width, 1.5 + row_height * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows), dtype=float)[::-1]  # the first row of the table on top
    height = 0.8 / len(ks)
    bars = []
    for j, k in enumerate(ks):
        recalls = [r.recall_at(k) for r in rows]
        values = np.array([rec.value for rec in recalls])
        low = np.array([rec.low for rec in recalls])
        high = np.array([rec.high for rec in recalls])
        offset = (len(ks) - 1 - j) * height - 0.4 + height / 2  # R@1 on top within a row
        # Clipped at 0: the interval contains the estimate, up to rounding.
        errors = np.clip(np.vstack([values - low, high - values]), 0.0, None)
        bars.append(
            ax.barh(
                y + offset,
                values,
                height=height * 0.95,
                xerr=errors,
                color=RECALL_COLOURS.get(k),
                edgecolor="white",
                error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "#333333"},
            )
        )
        for yy, v, h in zip(y + offset, values, high, strict=True):
            ax.text(h + 1.0, yy, f"{v:.1f}", va="center", fontsize=6.5)
    for i in range(1, len(rows)):
        if rows[i].query_set != rows[i - 1].query_set:
            ax.axhline(y[i] + 0.5, color="#777777", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=TICK)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 112)  # room for the value label of a 100% bar
    ax.set_xticks(range(0, 101, 20))
    ax.tick_params(axis="x", labelsize=TICK)
    ax.set_xlabel(xlabel, fontsize=LABEL)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    _figure_legend(fig, bars, [f"R@{k}" for k in ks])
    fig.suptitle(title, fontsize=SUPTITLE)
    # The estimate above can fall short for long labels: measure the drawn ones and widen to fit.
    fig.canvas.draw()
    drawn = max(t.get_window_extent().width for t in ax.get_yticklabels()) / fig.dpi
    if drawn > label_width:
        fig.set_size_inches(width + drawn - label_width, fig.get_size_inches()[1])
    return fig


# ----------------------------------------------------------------------------------------------
# calibration


def figure_calibration(report: Report) -> Figure:
    """A reliability diagram per calibration row: observed frequency per bin of predicted
    probability with its interval, the diagonal, and below it the number of predictions per bin."""
    rows = report.calibration
    if not rows:
        raise ValueError("the calibration figure needs at least one run with stored probabilities")
    ncols = min(3, len(rows))
    nrows = -(-len(rows) // ncols)
    panel_width = 3.4
    titles = [
        fit_lines(
            f"{run_label(report.run(c.run_id))}\n{CALIBRATION_TARGETS.get(c.kind, c.kind)}\n"
            f"ECE = {c.ece:.3f} · n = {c.n:,} predictions",
            panel_width,
            TITLE,
        )
        for c in rows
    ]
    title_height = max(lines_height(t, TITLE) for t in titles)
    width = 0.3 + ncols * (panel_width + 0.8)
    suptitle = fit_lines(
        f"Calibration: reliability diagrams (10 equal-width bins); error bars: {interval_name(report)}",
        width - 0.3,
        SUPTITLE,
    )
    fig = new_figure(width, 0.8 + lines_height(suptitle, SUPTITLE) + nrows * (3.6 + title_height))
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.0, 1.0] * nrows)
    for i, (row, title) in enumerate(zip(rows, titles, strict=True)):
        r, c = divmod(i, ncols)
        ax = fig.add_subplot(grid[2 * r, c])
        counts = fig.add_subplot(grid[2 * r + 1, c], sharex=ax)
        x = np.array([b.mean_probability for b in row.bins])
        freq = np.array([b.frequency for b in row.bins])
        errors = np.clip(
            np.vstack(
                [freq - [b.frequency_low for b in row.bins], [b.frequency_high for b in row.bins] - freq]
            ),
            0.0,
            None,
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color=OTHER_COLOUR, linewidth=1.0)
        ax.errorbar(
            x,
            freq,
            yerr=errors,
            fmt="o",
            markersize=4,
            color=RERANKED_COLOUR,
            ecolor="#333333",
            elinewidth=0.9,
            capsize=2,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("observed frequency", fontsize=LABEL)
        ax.set_title(title, fontsize=TITLE)
        ax.tick_params(labelsize=TICK, labelbottom=False)
        ax.grid(alpha=0.3)
        counts.bar(
            [b.low for b in row.bins], [b.n for b in row.bins], width=[b.high - b.low for b in row.bins],
            align="edge", color="#bbbbbb", edgecolor="white",
        )  # fmt: skip
        counts.set_ylabel("predictions", fontsize=LABEL)
        counts.set_xlabel("predicted probability (bin mean)", fontsize=LABEL)
        counts.tick_params(labelsize=TICK)
        counts.yaxis.set_major_locator(MaxNLocator(3, integer=True))
    _figure_legend(
        fig,
        [
            Line2D([], [], marker="o", linestyle="none", markersize=4, color=RERANKED_COLOUR),
            Line2D([], [], linestyle="--", color=OTHER_COLOUR),
            Patch(color="#bbbbbb"),
        ],
        [
            f"observed frequency with its {interval_name(report)}",
            "perfect calibration",
            "predictions per bin",
        ],
    )
    fig.suptitle(suptitle, fontsize=SUPTITLE)
    return fig


# ----------------------------------------------------------------------------------------------
# position bias


def figure_position_bias(report: Report) -> Figure:
    """Per pairwise run: first-shown win rate by stage-1 rank gap against the stage-1 prediction,
    and the positive's win rate shown first versus second; every rate with its interval."""
    rows = report.position_bias
    if not rows:
        raise ValueError("the position-bias figure needs at least one pairwise run with stored verdicts")
    left_width, right_width = 6.4, 3.0
    titles = []
    for row in rows:
        b = row.bias
        titles.append(
            fit_lines(
                f"{run_label(report.run(row.run_id))}\nthe first-shown tile wins {b.observed:.1%} of {b.n:,} "
                f"comparisons; stage-1 ranks alone predict {b.expected:.1%}",
                left_width,
                TITLE,
            )
        )
    title_height = max(lines_height(t, TITLE) for t in titles)
    width = left_width + right_width + 1.6
    suptitle = fit_lines(
        f"Position bias of pairwise judges; error bars: {interval_name(report)}", width - 0.3, SUPTITLE
    )
    fig = new_figure(width, 0.8 + lines_height(suptitle, SUPTITLE) + len(rows) * (2.4 + title_height))
    axes = fig.subplots(len(rows), 2, squeeze=False, width_ratios=[left_width, right_width])
    for (left, right), row, title in zip(axes, rows, titles, strict=True):
        b = row.bias
        gaps = np.array([g.gap for g in b.by_gap])
        observed = np.array([g.observed for g in b.by_gap])
        errors = np.clip(
            np.vstack([observed - [g.low for g in b.by_gap], [g.high for g in b.by_gap] - observed]),
            0.0,
            None,
        )
        left.axhline(0.5, color="#dddddd", linewidth=0.8, zorder=0)
        # Points only: gaps with few comparisons are noisy, a line would suggest a trend between them.
        left.errorbar(
            gaps, observed, yerr=errors, fmt="o", markersize=3.5, color=RERANKED_COLOUR, ecolor=RERANKED_COLOUR,
            elinewidth=0.8, capsize=1.5, zorder=3,
        )  # fmt: skip
        left.scatter(
            gaps, [g.expected for g in b.by_gap], marker="D", s=18, facecolors="none", edgecolors=EXPECTED_COLOUR,
            linewidths=1.0, zorder=4,
        )  # fmt: skip
        left.set_ylim(-0.03, 1.03)
        left.set_xlabel("stage-1 rank of the second-shown tile minus the first-shown's", fontsize=LABEL)
        left.set_ylabel("first-shown tile wins", fontsize=LABEL)
        left.set_title(title, fontsize=TITLE, loc="left")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.tick_params(labelsize=TICK)
        places = [("positive\nshown first", b.positive_first), ("positive\nshown second", b.positive_second)]
        for x, (_, share) in enumerate(places):
            if not share.n:
                right.text(x, 0.05, "none", ha="center", fontsize=TICK)
                continue
            right.errorbar(
                [x], [share.estimate],
                yerr=[[max(0.0, share.estimate - share.low)], [max(0.0, share.high - share.estimate)]],
                fmt="o", markersize=6, color=TRUE_COLOUR, ecolor=TRUE_COLOUR, elinewidth=1.2, capsize=4,
            )  # fmt: skip
            right.text(
                x, share.high + 0.03, f"{share.estimate:.0%} of {share.n:,}", ha="center", fontsize=TICK
            )
        right.set_xticks([0, 1], [p[0] for p in places], fontsize=TICK)
        right.set_xlim(-0.6, 1.6)
        right.set_ylim(-0.03, 1.15)
        right.set_ylabel("positive wins", fontsize=LABEL)
        right.tick_params(axis="y", labelsize=TICK)
        right.set_title("comparisons with the positive:\nequal rates = no position bias", fontsize=TITLE)
        right.grid(axis="y", alpha=0.3)
    _figure_legend(
        fig,
        [
            Line2D([], [], marker="o", linestyle="none", markersize=3.5, color=RERANKED_COLOUR),
            Line2D(
                [],
                [],
                marker="D",
                linestyle="none",
                markersize=4,
                markerfacecolor="none",
                color=EXPECTED_COLOUR,
            ),
            Line2D([], [], marker="o", linestyle="none", markersize=6, color=TRUE_COLOUR),
        ],
        [
            f"first-shown tile wins (share of that gap's comparisons, {interval_name(report)})",
            "stage-1 ranks alone predict",
            "positive wins",
        ],
    )
    fig.suptitle(suptitle, fontsize=SUPTITLE)
    return fig


# ----------------------------------------------------------------------------------------------
# training curves of fine-tuned adapters

LOSS_COLOUR = "#9aa5b8"  # every step's loss, thin
SMOOTH_COLOUR = "#1f4fd1"  # its running mean
ACCURACY_COLOUR = TRUE_COLOUR  # validation accuracy (right axis)
CHANCE = 0.5  # a pairwise judge that guesses


@dataclass(frozen=True)
class TrainingCurve:
    """What the training figure of one adapter draws: its job and its stored steps (step 0 is the
    validation before any training; validation rows every ``--eval-every`` steps)."""

    name: str
    judge: str
    base_model: str
    status: str
    total_steps: int
    steps: Sequence[int]
    loss: Sequence[float | None]  # None: a step with no training loss (step 0)
    val_accuracy: Sequence[float | None]  # None: no validation at that step

    @property
    def last_step(self) -> int:
        return max(self.steps, default=0)


def training_curves(s: Session, names: Sequence[str] = ()) -> list[TrainingCurve]:
    """The named adapters' curves (a ReportError for a name not stored, or with no step yet); no
    names: every adapter with stored steps, in creation order."""
    stored = adapters_store.adapters(s)
    if names:
        by_name = {a.name: a for a in stored}
        unknown = [n for n in dict.fromkeys(names) if n not in by_name]
        if unknown:
            known = ", ".join(by_name) or "none"
            raise ReportError(f"no adapter named {', '.join(map(repr, unknown))} (known: {known})")
        chosen = [by_name[n] for n in dict.fromkeys(names)]
    else:
        chosen = stored
    out = []
    for a in chosen:
        rows = adapters_store.training_steps(s, a.id)
        if not rows:
            if names:
                raise ReportError(
                    f"adapter {a.name!r} has no training step stored yet: see `orchestrator status {a.name}`"
                )
            continue
        out.append(
            TrainingCurve(
                name=a.name,
                judge=a.judge,
                base_model=a.base_model,
                status=a.status,
                total_steps=a.total_steps,
                steps=[r.step for r in rows],
                loss=[r.loss for r in rows],
                val_accuracy=[r.val_accuracy for r in rows],
            )
        )
    return out


def smoothing_window(n: int) -> int:
    """Steps in the running mean of ``n`` losses: about a twentieth of them, 1 to 100."""
    return max(1, min(100, round(n / 20)))


def running_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    sums = np.cumsum(np.insert(v, 0, 0.0))
    ends = np.arange(1, v.size + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def training_title(curve: TrainingCurve) -> str:
    accuracy = [a for a in curve.val_accuracy if a is not None]
    last = f"; last validation accuracy {accuracy[-1]:.3f}" if accuracy else ""
    return (
        f"Fine-tune {curve.name}: {curve.judge} on {curve.base_model}\n"
        f"step {curve.last_step:,} of {curve.total_steps:,} ({curve.status}){last}"
    )


def figure_training(curve: TrainingCurve) -> Figure:
    """Training loss per step (thin) and its running mean on the left axis; validation pairwise
    accuracy (markers) on the right axis, with the 0.5 a guessing judge gets."""
    width = 7.2
    title = fit_lines(training_title(curve), width - 0.4, SUPTITLE)
    fig = new_figure(width, 3.4 + lines_height(title, SUPTITLE))
    ax = fig.add_subplot()
    right = ax.twinx()
    trained = [(x, y) for x, y in zip(curve.steps, curve.loss, strict=True) if y is not None]
    validated = [(x, a) for x, a in zip(curve.steps, curve.val_accuracy, strict=True) if a is not None]
    window = smoothing_window(len(trained))
    handles: list[Any] = []
    labels: list[str] = []
    if trained:
        xs, ys = (np.array(v, dtype=float) for v in zip(*trained, strict=True))
        handles += ax.plot(xs, ys, color=LOSS_COLOUR, linewidth=0.7)
        labels.append("training loss (cross-entropy of the answer token), every step")
        if window > 1:
            handles += ax.plot(xs, running_mean(ys, window), color=SMOOTH_COLOUR, linewidth=1.8)
            labels.append(f"training loss, mean of the last {window} steps")
        ax.set_ylim(0, max(float(ys.max()) * 1.05, 1e-3))
    else:
        ax.text(0.5, 0.5, "no training step yet", transform=ax.transAxes, ha="center", fontsize=LABEL)
        ax.set_yticks([])
    handles.append(right.axhline(CHANCE, color=OTHER_COLOUR, linestyle="--", linewidth=1.0))
    labels.append(f"chance ({CHANCE:g}): a judge that guesses")
    if validated:
        vx, vy = zip(*validated, strict=True)
        handles += right.plot(
            vx, vy, marker="o", markersize=4.5, linestyle=":", linewidth=0.8, color=ACCURACY_COLOUR
        )
        labels.append("validation pairwise accuracy (held-out queries)")
    right.set_ylim(0, 1.02)
    ax.set_xlim(0, max(curve.total_steps, curve.last_step, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step", fontsize=LABEL)
    ax.set_ylabel("training loss", fontsize=LABEL, color=SMOOTH_COLOUR)
    right.set_ylabel("validation accuracy", fontsize=LABEL, color=ACCURACY_COLOUR)
    ax.tick_params(labelsize=TICK)
    right.tick_params(labelsize=TICK)
    ax.grid(alpha=0.3)
    _figure_legend(fig, handles, labels)
    fig.suptitle(title, fontsize=SUPTITLE)
    return fig


def training_caption(curve: TrainingCurve) -> str:
    return (
        f"Fine-tune {curve.name} ({curve.judge} on {curve.base_model}, step {curve.last_step:,} of "
        f"{curve.total_steps:,}, {curve.status}): training loss per step (thin) and its running mean; "
        "validation pairwise accuracy on the held-out queries (markers, right axis; dashed: chance)."
    )


# ----------------------------------------------------------------------------------------------
# Figure 5


@dataclass(frozen=True)
class TileImage:
    stage1_rank: int
    image: np.ndarray
    positive: bool
    reranked_top1: bool


@dataclass(frozen=True)
class Example:
    """One query of Figure 5: the panorama, its first stage-1 tiles, and (``extras``) the true
    tile and the reranker's top-1 when they sit further down."""

    title: str
    panorama: np.ndarray
    tiles: Sequence[TileImage]
    extras: Sequence[TileImage] = ()
    note: str = ""


def choose_examples(outcomes: Sequence[Mapping[str, Any]], n: int, seed: int = 0) -> list[tuple[int, str]]:
    """Pick ``n`` telling queries, round-robin over: fixed, broken, kept, missed (seeded within each).

    ``outcomes`` rows carry ``query_id``, ``stage1_rank`` and ``final_rank`` of the positive.
    """
    groups: dict[str, list[int]] = {"fixed": [], "broken": [], "kept": [], "missed": []}
    for o in outcomes:
        groups[_outcome_kind(o)].append(o["query_id"])
    rng = random.Random(seed)
    for ids in groups.values():
        rng.shuffle(ids)
    chosen: list[tuple[int, str]] = []
    while len(chosen) < n and any(groups.values()):
        for kind, ids in groups.items():
            if ids and len(chosen) < n:
                chosen.append((ids.pop(), kind))
    return chosen


def _outcome_kind(outcome: Mapping[str, Any]) -> str:
    before, after = outcome["stage1_rank"] == 1, outcome["final_rank"] == 1
    return {(False, True): "fixed", (True, False): "broken", (True, True): "kept"}.get(
        (before, after), "missed"
    )


EXAMPLE_TITLES = {
    "fixed": "reranking found the true tile",
    "broken": "reranking lost the true tile",
    "kept": "stage 1 and reranker both right",
    "missed": "neither puts the true tile first",
}


def example_title(kind: str, stage1_rank: int | None, final_rank: int | None, k: int) -> str:
    """What happened to the query's true tile, in words (stage-1 rank over the whole candidate set)."""
    if stage1_rank is None:
        where = "true tile not retrieved by stage 1"
    elif stage1_rank > k:
        where = f"true tile: stage 1 #{stage1_rank}, beyond K={k}, not reranked"
    else:
        where = f"true tile: stage 1 #{stage1_rank}, " + (
            "not in the ranking" if final_rank is None else f"reranked #{final_rank}"
        )
    return f"{EXAMPLE_TITLES[kind]} ({where})"


def tiles_to_show(
    candidates: Sequence[Mapping[str, Any]], n_tiles: int = TILES_SHOWN
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The first ``n_tiles`` stage-1 candidates, and after them the true tile and the reranker's
    top-1 when they sit further down (rows carry ``stage1_rank``, ``positive``, ``reranked_top1``)."""
    ordered = sorted(candidates, key=lambda t: t["stage1_rank"])
    shown = [t for t in ordered if t["stage1_rank"] <= n_tiles]
    extras = [t for t in ordered if t["stage1_rank"] > n_tiles and (t["positive"] or t["reranked_top1"])]
    return shown, extras


def figure5_examples(examples: Sequence[Example], title: str) -> Figure:
    """Rows of panorama + tiles in stage-1 order; true tile dashed green, reranker's top-1 outlined blue."""
    if not examples:
        raise ValueError("Figure 5 needs at least one example query")
    n_tiles = max(len(e.tiles) for e in examples)
    n_extras = max(len(e.extras) for e in examples)
    ncols = 1 + n_tiles + n_extras
    tile_size = 1.3  # inches; the panorama is two tiles wide
    width = 0.3 + (ncols + 1) * (tile_size + 0.06)
    pano_titles = [
        fit_lines(f"{e.title}\n{e.note}" if e.note else e.title, 2 * tile_size, 7.5) for e in examples
    ]
    title_height = max(max(lines_height(t, 7.5) for t in pano_titles), lines_height("#1", 8))
    label_height = lines_height("true tile and\nreranker's top-1", 7) if n_extras else 0.0
    legend = "tiles in stage-1 order; green dashed: true tile; blue outline: reranker's top-1"
    if n_extras:
        legend += f"; last: either one from beyond the top {n_tiles}"
    suptitle = fit_lines(f"{title}\n{legend}", width - 0.4, 9)
    row_height = tile_size + title_height + label_height + 0.12
    fig = new_figure(width, 0.2 + lines_height(suptitle, 9) + len(examples) * row_height)
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.08)  # the top-1's 4 pt outline reaches past its axes
    grid = fig.add_gridspec(len(examples), ncols, width_ratios=[2.0] + [1.0] * (ncols - 1))
    for i, (ex, pano_title) in enumerate(zip(examples, pano_titles, strict=True)):
        pano = fig.add_subplot(grid[i, 0])
        pano.imshow(ex.panorama)
        pano.set_xticks([])
        pano.set_yticks([])
        pano.set_title(pano_title, fontsize=7.5, loc="left")
        for j, tile in enumerate(ex.tiles):
            _draw_tile(fig.add_subplot(grid[i, 1 + j]), tile)
        for j, tile in enumerate(ex.extras):
            ax = fig.add_subplot(grid[i, 1 + n_tiles + j])
            _draw_tile(ax, tile)
            what = [
                name
                for name, on in (("true tile", tile.positive), ("reranker's top-1", tile.reranked_top1))
                if on
            ]
            ax.set_xlabel(
                " and\n".join(what),
                fontsize=7,
                color=TRUE_COLOUR if tile.positive else RERANKED_COLOUR,
            )
    fig.suptitle(suptitle, fontsize=9)
    return fig


def _draw_tile(ax: Any, tile: TileImage) -> None:
    ax.imshow(tile.image)
    ax.set_xticks([])
    ax.set_yticks([])
    label = f"#{tile.stage1_rank}"
    colour = "black"
    if tile.positive:
        label += " true"
        colour = TRUE_COLOUR
        ax.add_patch(
            Rectangle(
                (0.06, 0.06),
                0.88,
                0.88,
                transform=ax.transAxes,
                fill=False,
                edgecolor=TRUE_COLOUR,
                linewidth=2.2,
                linestyle="--",
            )
        )
    ax.set_title(label, fontsize=8, color=colour, fontweight="bold" if tile.positive else "normal")
    for spine in ax.spines.values():
        if tile.reranked_top1:
            spine.set_edgecolor(RERANKED_COLOUR)
            spine.set_linewidth(4.0)
        else:
            spine.set_edgecolor("#cccccc")
            spine.set_linewidth(0.8)


def load_image(path: Path) -> np.ndarray:
    """The image as an RGB array, shrunk for drawing; a grey placeholder when it cannot be read."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail(THUMBNAIL)
            return np.asarray(img)
    except (OSError, ValueError):
        placeholder = np.full((64, 64, 3), 200, dtype=np.uint8)
        placeholder[::8, :] = 150  # hatched: visibly not an image
        return placeholder


# ----------------------------------------------------------------------------------------------
# from the database to files


def write_figures(
    s: Session,
    report: Report,
    out: Path,
    *,
    examples: int = 4,
    query_names: Sequence[str] = (),
    seed: int = 0,
    adapter_names: Sequence[str] = (),
) -> list[Path]:
    """Write every figure the report supports, the training curve of the named adapters (none
    named: of every adapter with stored steps), and index.html; returns the paths written."""
    from orchestrator.reporting.page import write_page

    # Chosen first: a --query that a run did not finish, or an --adapter not stored or not started,
    # fails before any file is written.
    chosen = {
        run.run_id: example_queries(
            reports.run_query_outcomes(s, run.run_id), run.run_id, examples, query_names, seed
        )
        for run in report.runs
    }
    curves = training_curves(s, adapter_names)
    level = interval_name(report)
    written: list[tuple[Path, str]] = []

    def add(fig: Figure, name: str, caption: str) -> None:
        written.append((save(fig, out / name), caption))

    if report.baselines or report.runs:
        add(
            figure4_recall(report),
            "figure4_recall.png",
            f"Figure 4. Recall@k per row of Table 1 with {level}s over queries; each run beside its baseline "
            "(stage 1 on the same query set, cut at the run's K).",
        )
    panels = score_panels(report, reports.pointwise_scores(s, [r.run_id for r in report.runs]))
    if panels:
        add(
            figure3_scores(panels),
            "figure3_scores.png",
            "Figure 3. Pointwise score distributions: the positive tile against the other candidates; the "
            "separation is within each query, averaged over queries.",
        )
    if report.calibration:
        add(
            figure_calibration(report),
            "calibration.png",
            "Calibration: observed frequency against predicted probability per bin, with "
            f"{level}s; the diagonal is perfect calibration.",
        )
    if report.position_bias:
        add(
            figure_position_bias(report),
            "position_bias.png",
            "Position bias of pairwise runs: the first-shown tile's win rate per stage-1 rank gap against the "
            f"rate stage-1 ranks predict, and the positive's win rate when shown first or second ({level}s).",
        )
    for run in report.runs:
        if not chosen[run.run_id]:
            continue
        add(
            figure5_examples(load_examples(s, run.run_id, run.k, chosen[run.run_id]), run_label(run)),
            f"figure5_run{run.run_id}.png",
            f"Figure 5. {run_label(run)}: panoramas with their top-{TILES_SHOWN} stage-1 tiles, then the true "
            "tile or the reranker's top-1 when further down (with its stage-1 rank); the true tile dashed "
            "green, the reranker's top-1 outlined blue.",
        )
    for curve in curves:
        add(figure_training(curve), f"training-{curve.name}.png", training_caption(curve))
    page = write_page(out, report, written)
    return [p for p, _ in written] + [page]


def example_queries(
    outcomes: Sequence[Mapping[str, Any]], run_id: int, n: int, query_names: Sequence[str], seed: int
) -> list[tuple[Mapping[str, Any], str]]:
    """Figure 5's queries of a run, as (``reports.run_query_outcomes`` row, kind): the named ones,
    else ``n`` chosen by ``choose_examples``; a ReportError for a name the run did not finish."""
    if not query_names:
        by_id = {o["query_id"]: o for o in outcomes}
        return [(by_id[q], kind) for q, kind in choose_examples(outcomes, n, seed)]
    by_name = {o["query"]: o for o in outcomes}
    missing = [q for q in query_names if q not in by_name]
    if missing:
        raise ReportError(f"run {run_id} has no finished query named {', '.join(map(repr, missing))}")
    return [(by_name[q], _outcome_kind(by_name[q])) for q in dict.fromkeys(query_names)]


def load_examples(
    s: Session, run_id: int, k: int, chosen: Sequence[tuple[Mapping[str, Any], str]]
) -> list[Example]:
    query_ids = [o["query_id"] for o, _ in chosen]
    queries = reports.query_images(s, query_ids)
    candidates: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in reports.candidate_images(s, run_id, query_ids, TILES_SHOWN):
        candidates[t["query_id"]].append(t)
    out = []
    for o, kind in chosen:
        q = queries[o["query_id"]]
        root = Path(q["root"])

        def tile(t: Mapping[str, Any], root: Path = root) -> TileImage:
            return TileImage(
                t["stage1_rank"], load_image(root / t["path"]), bool(t["positive"]), bool(t["reranked_top1"])
            )

        shown, extras = tiles_to_show(candidates[o["query_id"]])
        out.append(
            Example(
                title=example_title(kind, o["stage1_rank"], o["final_rank"], k),
                panorama=load_image(root / q["path"]),
                tiles=[tile(t) for t in shown],
                extras=[tile(t) for t in extras],
                note=_short_query(q["name"]),
            )
        )
    return out


def _short_query(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
