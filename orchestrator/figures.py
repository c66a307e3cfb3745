"""The paper's figures as PNG files, drawn from what the database stores.

- Figure 3: pointwise score distributions per run, for the positive tile and for the rest
  (the paper's evidence that pointwise scores do not separate the true match).
- Figure 4: Recall@1/3/5/10 per method with bootstrap error bars, sorted by R@1.
- Figure 5: qualitative examples: the panorama, the top-5 tiles in stage-1 order, the true tile
  marked (green, dashed) and the reranker's top-1 outlined (blue, as in the paper).
- Position bias (pairwise runs): how often the first-shown tile wins, against the rate stage-1
  ranks alone predict, and how often the positive wins when shown first versus second.

The plotting functions take plain records and return a matplotlib ``Figure`` (object API on the
Agg canvas: no pyplot state, safe in any thread); ``write_figures`` reads the SQL in
``db/reports.py`` and writes the files plus ``index.html``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sqlalchemy.orm import Session

from db import reports
from db.reports import RECALL_KS
from orchestrator import stats
from orchestrator.report import Report, ReportError, options_label

DPI = 120
TRUE_COLOUR = "#1a9641"  # the true tile, positives
RERANKED_COLOUR = "#1f4fd1"  # the reranker's top-1 (the paper outlines it in blue)
OTHER_COLOUR = "#8c8c8c"
RECALL_COLOURS = {1: "#1f4fd1", 3: "#4f8fdc", 5: "#92bde8", 10: "#cfe2f5"}
# Score axis per pointwise prompt (Yes/No and reasoning: P(Yes); Likert: expectation; Direct: 0-100).
SCORE_AXES = {
    "yesno": ((0.0, 1.0), "P(Yes)"),
    "reason": ((0.0, 1.0), "P(Yes) after reasoning"),
    "likert": ((1.0, 5.0), "Likert expectation (1-5)"),
    "direct": ((0.0, 100.0), "direct score (0-100)"),
}
TILES_SHOWN = 5
THUMBNAIL = (512, 512)  # VIGOR panoramas are 2048 x 1024: shrink before drawing


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _short_model(model: str | None) -> str:
    return (model or "-").rstrip("/").rsplit("/", 1)[-1]


def method_label(row: Mapping[str, Any], with_candidates: bool = False) -> str:
    """How a report row is named on a figure axis."""
    if row["strategy"] == "baseline":
        label = "baseline (stage 1)"
    elif row["strategy"] == "retrieval":
        label = f"retrieval, whole gallery · {_short_model(row.get('model'))}"
    else:
        model = _short_model(row.get("model")) + options_label(row.get("judge_options"))
        label = f"{row['strategy']}/{row.get('prompt')}{options_label(row.get('strategy_options'))} · {model}"
        label += f" (run {row['run_id']})"
    return f"{label} · {row['candidates']}" if with_candidates else label


# ----------------------------------------------------------------------------------------------
# Figure 3


@dataclass(frozen=True)
class ScorePanel:
    """One pointwise run's scores, split by whether the tile is the query's positive."""

    label: str
    prompt: str
    positives: Sequence[float]
    others: Sequence[float]


def figure3_scores(panels: Sequence[ScorePanel]) -> Figure:
    """Histograms (density) of positives' and other candidates' scores, one panel per run."""
    if not panels:
        raise ValueError("Figure 3 needs at least one pointwise run with stored scores")
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = new_figure(5.2 * ncols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        (lo, hi), xlabel = SCORE_AXES.get(panel.prompt, ((None, None), "score"))
        values = [*panel.positives, *panel.others]
        if lo is None:
            lo, hi = float(min(values)), float(max(values))
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 26)
        ax.hist(
            panel.others,
            bins=bins,
            density=True,
            color=OTHER_COLOUR,
            alpha=0.55,
            label=f"other candidates (n={len(panel.others):,})",
        )
        ax.hist(
            panel.positives,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=2.0,
            color=TRUE_COLOUR,
            label=f"positive (n={len(panel.positives):,})",
        )
        separation = stats.auc(panel.positives, panel.others)
        title = panel.label
        if separation is not None:
            title += f"\nP(positive scores above another candidate) = {separation:.2f}"
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_xlim(lo, hi)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Figure 3. Pointwise scores of the positive tile and of the other candidates", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# Figure 4


def figure4_recall(rows: Sequence[Mapping[str, Any]], ks: Sequence[int] = RECALL_KS) -> Figure:
    """Grouped horizontal bars of R@k per method with their confidence intervals, best R@1 on top."""
    rows = [r for r in rows if r.get("recall@1") is not None]
    if not rows:
        raise ValueError("Figure 4 needs at least one report row with Recall@k")
    with_candidates = len({r["candidates"] for r in rows}) > 1
    ordered = sorted(rows, key=lambda r: r["recall@1"])  # barh draws bottom-up: best ends on top
    height = 0.8 / len(ks)
    fig = new_figure(9.0, 1.0 + 0.55 * len(ordered) * max(1, len(ks) / 2.5))
    ax = fig.add_subplot()
    y = np.arange(len(ordered), dtype=float)
    for j, k in enumerate(ks):
        values = np.array([r[f"recall@{k}"] for r in ordered], dtype=float)
        low = np.array([r.get(f"recall@{k}_ci_low", v) for r, v in zip(ordered, values, strict=True)])
        high = np.array([r.get(f"recall@{k}_ci_high", v) for r, v in zip(ordered, values, strict=True)])
        offset = (len(ks) - 1 - j) * height - 0.4 + height / 2  # R@1 on top within a group
        bars = ax.barh(
            y + offset,
            values,
            height=height * 0.95,
            xerr=np.vstack([values - low, high - values]),
            color=RECALL_COLOURS.get(k, None),
            edgecolor="white",
            error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "#333333"},
            label=f"R@{k}",
        )
        for rect, v, h in zip(bars, values, high, strict=True):
            ax.text(h + 0.6, rect.get_y() + rect.get_height() / 2, f"{v:.1f}", va="center", fontsize=6.5)
    ax.set_yticks(y, [method_label(r, with_candidates) for r in ordered], fontsize=8)
    ax.set_xlim(0, 108)
    ax.set_xlabel("Recall@k (%); error bars: bootstrap confidence interval over queries")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncols=len(ks), frameon=False)
    ax.set_title("Figure 4. Recall per strategy and model, sorted by R@1", fontsize=10)
    return fig


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
    """One query of Figure 5: the panorama and its first stage-1 tiles (plus the reranker's top-1)."""

    title: str
    panorama: np.ndarray
    tiles: Sequence[TileImage]
    extra: TileImage | None = None  # the reranker's top-1 when it is not among the tiles shown
    note: str = ""


def choose_examples(outcomes: Sequence[Mapping[str, Any]], n: int, seed: int = 0) -> list[tuple[int, str]]:
    """Pick ``n`` telling queries, round-robin over: fixed, broken, kept, missed (seeded within each).

    ``outcomes`` rows carry ``query_id``, ``stage1_rank`` and ``final_rank`` of the positive.
    """
    groups: dict[str, list[int]] = {"fixed": [], "broken": [], "kept": [], "missed": []}
    for o in outcomes:
        before, after = o["stage1_rank"] == 1, o["final_rank"] == 1
        kind = {(False, True): "fixed", (True, False): "broken", (True, True): "kept"}.get(
            (before, after), "missed"
        )
        groups[kind].append(o["query_id"])
    rng = random.Random(seed)
    for ids in groups.values():
        rng.shuffle(ids)
    chosen: list[tuple[int, str]] = []
    while len(chosen) < n and any(groups.values()):
        for kind, ids in groups.items():
            if ids and len(chosen) < n:
                chosen.append((ids.pop(), kind))
    return chosen


EXAMPLE_TITLES = {
    "fixed": "reranking found the true tile",
    "broken": "reranking lost the true tile",
    "kept": "stage 1 and reranker both right",
    "missed": "neither puts the true tile first",
}


def figure5_examples(examples: Sequence[Example], title: str) -> Figure:
    """Rows of panorama + tiles in stage-1 order; true tile dashed green, reranker's top-1 outlined blue."""
    if not examples:
        raise ValueError("Figure 5 needs at least one example query")
    n_tiles = max(len(e.tiles) for e in examples)
    extra = any(e.extra is not None for e in examples)
    ncols = 1 + n_tiles + (1 if extra else 0)
    fig = new_figure(2.6 + 1.45 * (ncols - 1), 0.5 + 1.75 * len(examples))
    grid = fig.add_gridspec(len(examples), ncols, width_ratios=[2.0] + [1.0] * (ncols - 1))
    for i, ex in enumerate(examples):
        pano = fig.add_subplot(grid[i, 0])
        pano.imshow(ex.panorama)
        pano.set_xticks([])
        pano.set_yticks([])
        pano.set_title(f"{ex.title}\n{ex.note}" if ex.note else ex.title, fontsize=7.5, loc="left")
        for j, tile in enumerate(ex.tiles):
            _draw_tile(fig.add_subplot(grid[i, 1 + j]), tile)
        if ex.extra is not None:
            ax = fig.add_subplot(grid[i, ncols - 1])
            _draw_tile(ax, ex.extra)
            ax.set_xlabel("reranker's top-1\n(beyond the top 5)", fontsize=7, color=RERANKED_COLOUR)
    fig.suptitle(
        f"{title}\ntiles in stage-1 order; green dashed: true tile; blue outline: reranker's top-1",
        fontsize=9,
    )
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
# position bias


@dataclass(frozen=True)
class BiasPanel:
    label: str
    bias: stats.PositionBias
    positive_first: stats.Interval | None = None
    positive_second: stats.Interval | None = None


def position_bias_panel(
    label: str,
    counts: Sequence[stats.PairCount],
    positive_rank_share: Mapping[int, float],
    *,
    seed: int = 0,
    n_resamples: int = 2000,
) -> BiasPanel:
    bias = stats.position_bias(counts, positive_rank_share)

    def interval(n: int, rate: float | None) -> stats.Interval | None:
        if not n or rate is None:
            return None
        wins = round(rate * n)
        return stats.bootstrap_mean([1] * wins + [0] * (n - wins), n_resamples=n_resamples, seed=seed)

    return BiasPanel(
        label,
        bias,
        interval(bias.positive_first_n, bias.positive_first_wins),
        interval(bias.positive_second_n, bias.positive_second_wins),
    )


def figure_position_bias(panels: Sequence[BiasPanel]) -> Figure:
    """Per pairwise run: first-shown win rate by stage-1 rank gap, and the positive's win rate by place."""
    if not panels:
        raise ValueError("the position-bias plot needs at least one pairwise run with stored verdicts")
    fig = new_figure(10.0, 0.6 + 3.0 * len(panels))
    axes = fig.subplots(len(panels), 2, squeeze=False, width_ratios=[2.2, 1.0])
    for (left, right), panel in zip(axes, panels, strict=True):
        b = panel.bias
        gaps = np.array([g.gap for g in b.by_gap])
        n = np.array([g.n for g in b.by_gap], dtype=float)
        left.plot(
            gaps,
            [g.expected for g in b.by_gap],
            linestyle="--",
            color=OTHER_COLOUR,
            marker="",
            label="expected from stage-1 ranks",
        )
        left.plot(gaps, [g.observed for g in b.by_gap], color=RERANKED_COLOUR, linewidth=1.2)
        left.scatter(
            gaps,
            [g.observed for g in b.by_gap],
            s=12 + 120 * n / n.max(),
            color=RERANKED_COLOUR,
            zorder=3,
            label="observed (dot size: comparisons)",
        )
        left.axhline(0.5, color="#dddddd", linewidth=0.8, zorder=0)
        left.set_ylim(-0.02, 1.02)
        left.set_xlabel("stage-1 rank of the second-shown tile minus the first-shown's")
        left.set_ylabel("first-shown tile wins")
        left.set_title(
            f"{panel.label}\nthe first-shown tile wins {b.observed:.1%} of {b.n:,} comparisons; "
            f"stage-1 ranks alone predict {b.expected:.1%}",
            fontsize=8.5,
            loc="left",
        )
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.legend(fontsize=7, loc="lower right")
        places = [("positive shown first", panel.positive_first, b.positive_first_n)]
        places.append(("positive shown second", panel.positive_second, b.positive_second_n))
        for x, (_name, ci, count) in enumerate(places):
            if ci is None:
                right.text(x, 0.05, "none", ha="center", fontsize=8)
                continue
            right.bar(
                x,
                ci.estimate,
                yerr=[[ci.estimate - ci.low], [ci.high - ci.estimate]],
                color=TRUE_COLOUR if x == 0 else "#a6d96a",
                capsize=3,
                width=0.6,
            )
            right.text(x, ci.high + 0.02, f"{ci.estimate:.0%} of {count:,}", ha="center", fontsize=8)
        right.set_xticks([0, 1], [p[0] for p in places], fontsize=8)
        right.set_ylim(0, 1.15)
        right.set_ylabel("positive wins")
        right.set_title("comparisons with the positive:\nequal bars = no position bias", fontsize=8.5)
    fig.suptitle("Position bias of pairwise judges", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# from the database to files


@dataclass
class Written:
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path, caption)

    def add(self, path: Path, caption: str) -> None:
        self.files.append((path, caption))


def write_figures(
    s: Session,
    report: Report,
    out: Path,
    *,
    examples: int = 4,
    query_names: Sequence[str] = (),
    seed: int = 0,
) -> list[Path]:
    """Write every figure the reported runs support, and index.html; returns the paths written."""
    from orchestrator.report_page import write_page

    run_rows = [r for r in report.rows if r.get("mcnemar_p") is not None]
    run_ids = [r["run_id"] for r in run_rows]
    written = Written()
    save(figure4_recall(report.rows), out / "figure4_recall.png")
    written.add(
        out / "figure4_recall.png",
        "Figure 4. Recall@k per method with 95% bootstrap intervals, sorted by R@1.",
    )
    panels = score_panels(s, run_rows)
    if panels:
        save(figure3_scores(panels), out / "figure3_scores.png")
        written.add(
            out / "figure3_scores.png",
            "Figure 3. Pointwise score distributions: the positive tile against the other candidates.",
        )
    bias = bias_panels(s, run_rows, seed=seed)
    if bias:
        save(figure_position_bias(bias), out / "position_bias.png")
        written.add(
            out / "position_bias.png",
            "Position bias of pairwise runs: the first-shown tile's win rate against the rate stage-1 "
            "ranks predict, and the positive's win rate when shown first or second.",
        )
    for row in run_rows:
        chosen = example_queries(s, row["run_id"], examples, query_names, seed)
        if not chosen:
            continue
        path = out / f"figure5_run{row['run_id']}.png"
        save(figure5_examples(load_examples(s, row["run_id"], chosen), method_label(row)), path)
        written.add(
            path,
            f"Figure 5. Run {row['run_id']}: panoramas with their top-{TILES_SHOWN} stage-1 tiles; the true "
            "tile dashed green, the reranker's top-1 outlined blue.",
        )
    page = write_page(out, report, written.files, run_ids)
    return [p for p, _ in written.files] + [page]


def score_panels(s: Session, run_rows: Sequence[Mapping[str, Any]]) -> list[ScorePanel]:
    by_run: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in reports.pointwise_scores(s, [row["run_id"] for row in run_rows]):
        by_run[r["run_id"]][0 if r["positive"] else 1].append(float(r["score"]))
    return [
        ScorePanel(method_label(row), row.get("prompt") or "", *by_run[row["run_id"]])
        for row in run_rows
        if row["run_id"] in by_run
    ]


def bias_panels(s: Session, run_rows: Sequence[Mapping[str, Any]], seed: int = 0) -> list[BiasPanel]:
    counts: dict[int, list[stats.PairCount]] = defaultdict(list)
    sets: dict[int, int] = {}
    for r in reports.position_counts(s, [row["run_id"] for row in run_rows]):
        sets[r["run_id"]] = r["candidate_set_id"]
        counts[r["run_id"]].append(
            stats.PairCount(
                r["first_rank"],
                r["second_rank"],
                bool(r["first_positive"]),
                bool(r["second_positive"]),
                int(r["n"]),
                int(r["first_wins"]),
            )
        )
    shares = reports.positive_rank_shares(s, sorted(set(sets.values())))
    return [
        position_bias_panel(
            method_label(row), counts[row["run_id"]], shares.get(sets[row["run_id"]], {}), seed=seed
        )
        for row in run_rows
        if counts.get(row["run_id"])
    ]


def example_queries(
    s: Session, run_id: int, n: int, query_names: Sequence[str], seed: int
) -> list[tuple[int, str]]:
    outcomes = reports.run_query_outcomes(s, run_id)
    if not query_names:
        return choose_examples(outcomes, n, seed)
    by_name = {o["query"]: o for o in outcomes}
    missing = [q for q in query_names if q not in by_name]
    if missing:
        raise ReportError(f"run {run_id} has no finished query named {', '.join(map(repr, missing))}")
    return [
        (by_name[q]["query_id"], choose_examples([by_name[q]], 1)[0][1]) for q in dict.fromkeys(query_names)
    ]


def load_examples(s: Session, run_id: int, chosen: Sequence[tuple[int, str]]) -> list[Example]:
    query_ids = [q for q, _ in chosen]
    queries = reports.query_images(s, query_ids)
    tiles: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in reports.candidate_images(s, run_id, query_ids, TILES_SHOWN):
        tiles[t["query_id"]].append(t)
    outcomes = {o["query_id"]: o for o in reports.run_query_outcomes(s, run_id)}
    out = []
    for query_id, kind in chosen:
        q = queries[query_id]
        root = Path(q["root"])

        def tile(t: dict[str, Any], root: Path = root) -> TileImage:
            return TileImage(
                t["stage1_rank"], load_image(root / t["path"]), bool(t["positive"]), bool(t["reranked_top1"])
            )

        shown = [tile(t) for t in tiles[query_id] if t["stage1_rank"] <= TILES_SHOWN]
        beyond = [tile(t) for t in tiles[query_id] if t["stage1_rank"] > TILES_SHOWN]
        o = outcomes[query_id]
        where = "not retrieved" if o["stage1_rank"] is None else f"stage 1 #{o['stage1_rank']}"
        after = "-" if o["final_rank"] is None else f"#{o['final_rank']}"
        out.append(
            Example(
                title=f"{EXAMPLE_TITLES[kind]} (true tile: {where}, reranked {after})",
                panorama=load_image(root / q["path"]),
                tiles=shown,
                extra=beyond[0] if beyond else None,
                note=_short_query(q["name"]),
            )
        )
    return out


def _short_query(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
