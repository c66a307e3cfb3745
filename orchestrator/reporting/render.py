"""A ``Report`` as text: an aligned table, markdown, CSV and JSON, and the files ``--out`` writes.

The text table fits ``TABLE_WIDTH`` columns: each R@k interval goes on the line below its value,
and notes, captions and long text cells (options, model names) wrap. ``wide=True`` puts every
row on one line instead, as the table1.txt that ``--out`` writes does.

The human formats are blocks (caption, headers, cells) shared with the HTML page; CSV has one
line per Table 1 row (baselines and runs), each run with its tests against its baseline; JSON is
the whole report, every kind of row under its own key.

A run reranked with a fine-tuned judge (``submit --adapter``) is named "<model> + adapter <NAME>"
wherever its model is (Table 1, the figures' labels); CSV and JSON carry ``adapter``,
``adapter_sha256`` and ``adapter_overlap``. A run whose adapter saw some of its queries in
training (``--allow-overlap``) is marked ``†``, and a note says how many.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.reporting.build import ReportError
from orchestrator.reporting.rows import (
    ADJUSTMENT_METHOD,
    DIFFERENCE_METHOD,
    INTERVAL_METHOD,
    OVERLAP_MARK,
    RECALL_KS,
    TEST_METHOD,
    BaselineRow,
    Report,
    RunRow,
)

FORMATS = ("table", "markdown", "csv", "json")
REPORT_FILES = {"table": "table1.txt", "markdown": "table1.md", "csv": "table1.csv", "json": "table1.json"}
TABLE_WIDTH = 120
NARROW_FOOTNOTE = "R@k intervals sit below their values and long cells wrap to fit 120 columns; --wide for all columns on one line"
MIN_WRAP = 8  # a wrapped column keeps at least this many characters per line


@dataclass
class Block:
    """One table of the report: caption, headers, cells; ``numeric`` columns align right and
    ``bold`` cells (row, column) are the best of their query set and K, as the paper marks them."""

    caption: str
    headers: list[str]
    body: list[list[str]]
    numeric: set[int] = field(default_factory=set)
    bold: set[tuple[int, int]] = field(default_factory=set)
    # Cells "value [low, high]" whose interval the narrow text table puts on a second line.
    stacked: set[int] = field(default_factory=set)


def format_report(report: Report, fmt: str, wide: bool = False) -> str:
    """``report`` in ``fmt``; ``wide`` only changes the text table (see the module docstring)."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2)
    if fmt == "csv":
        return _csv(report)
    if fmt == "table":
        return _table(report, wide)
    if fmt == "markdown":
        return _markdown(report)
    raise ReportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def prepare_out_dir(path: Path) -> Path:
    """Create ``path`` if needed and make sure files can be written there; else a ReportError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cvgl-write-check-"):
            pass
    except OSError as exc:
        raise ReportError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    return path


def write_report_files(report: Report, out_dir: Path) -> list[Path]:
    """The report in every format under ``out_dir`` (prepared by ``prepare_out_dir``); the text
    table wide, since a file is the whole record and no terminal wraps it."""
    written = []
    for fmt, name in REPORT_FILES.items():
        path = out_dir / name
        path.write_text(format_report(report, fmt, wide=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# labels shared with the figures and the page


def options_text(options: Mapping[str, Any] | None) -> str:
    """ "accuracy=0.9, batch_size=64": sorted, every option stored."""
    return ", ".join(f"{k}={_value(v)}" for k, v in sorted((options or {}).items())) or "-"


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def short_model(model: str | None) -> str:
    return (model or "-").rstrip("/").rsplit("/", 1)[-1]


def model_label(row: RunRow) -> str:
    """The run's model as the report names it: "llava-1.5-7b-hf", or with a fine-tuned judge
    "llava-1.5-7b-hf + adapter city-lora", marked with ``OVERLAP_MARK`` when the adapter saw some of
    the run's queries in training (a note says how many)."""
    name = short_model(row.model)
    if row.adapter:
        name += f" + adapter {row.adapter}"
    return name + (OVERLAP_MARK if row.adapter_overlap > 0 else "")


def method(row: BaselineRow | RunRow) -> str:
    if isinstance(row, BaselineRow):
        return "baseline (stage 1)"
    return f"{row.strategy}/{row.prompt}"


def run_label(row: BaselineRow | RunRow) -> str:
    """How a row is named on a figure: method, model, K and query set, then on a second line every
    strategy and judge option stored with the run, so no two runs look alike."""
    if isinstance(row, BaselineRow):
        return f"baseline (stage 1) · K={row.k} · {row.query_set}"
    options = {**row.strategy_options, **row.judge_options}
    return (
        f"run {row.run_id}: {method(row)} · {model_label(row)} · K={row.k} · {row.query_set}\n"
        + options_text(options).replace(", ", " ")
    )


def query_sets_line(report: Report) -> str:
    return "query sets: " + "; ".join(
        f"{qs.label} = {qs.n_queries} queries of {qs.candidates!r}"
        + (f" (run {', '.join(map(str, qs.run_ids))})" if qs.run_ids else " (all of the set)")
        for qs in report.query_sets
    )


def header_lines(report: Report) -> list[str]:
    """What every format states first: methods, confidence level, query sets, left-out runs."""
    return [*report.notes, query_sets_line(report)] if report.query_sets else list(report.notes)


# ----------------------------------------------------------------------------------------------
# blocks


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _recall_cell(row: BaselineRow | RunRow, k: int) -> str:
    r = row.recall_at(k)
    return f"{r.value:.1f} [{r.low:.1f}, {r.high:.1f}]"


def table_blocks(report: Report) -> list[Block]:
    level = f"{report.confidence:.0%}"
    blocks = [_table1(report, level)]
    if report.comparisons:
        blocks.append(
            Block(
                f"R@k differences on the same queries: {level} {DIFFERENCE_METHOD} interval, {TEST_METHOD} p "
                f"on the queries fixed and broken, {ADJUSTMENT_METHOD}-adjusted p over all "
                f"{len(report.comparisons)} tests",
                [
                    "run",
                    "against",
                    "k",
                    "queries",
                    "fixed",
                    "broken",
                    "ΔR@k",
                    f"{level} interval",
                    "McNemar p",
                    "Holm p",
                ],  # fmt: skip
                [
                    [
                        str(c.run_id),
                        c.against,
                        str(c.k),
                        str(c.n),
                        str(c.fixed),
                        str(c.broken),
                        f"{c.delta:+.1f}",
                        f"[{c.low:+.1f}, {c.high:+.1f}]",
                        _p(c.p_value),
                        _p(c.p_holm),
                    ]  # fmt: skip
                    for c in report.comparisons
                ],
                {2, 3, 4, 5, 6, 8, 9},
            )
        )
    if report.runs:
        blocks.append(
            Block(
                "Settings stored with each run when it was created",
                ["run", "K", "status", "queries done/planned", "strategy options", "judge options"],
                [
                    [
                        str(r.run_id),
                        str(r.k),
                        r.status,
                        f"{r.n_finished}/{r.n_planned}",
                        options_text(r.strategy_options),
                        options_text(r.judge_options),
                    ]  # fmt: skip
                    for r in report.runs
                ],
                {1},
            )
        )
    if report.calibration:
        blocks.append(
            Block(
                "Calibration: pointwise score (on [0, 1]) against 'this tile is the positive'; pairwise "
                "P(first) against 'the first-shown tile is the better one' (comparisons with the positive)",
                ["run", "judgments", "predictions", "ECE (10 bins)", "within-query separation"],
                [
                    [str(c.run_id), c.kind, str(c.n), f"{c.ece:.3f}", _num(c.separation, 3)]
                    for c in report.calibration
                ],
                {2, 3, 4},
            )
        )
    if report.position_bias:
        blocks.append(
            Block(
                f"Position bias of pairwise runs ({level} {INTERVAL_METHOD} intervals): equal rates for the "
                "positive shown first and second mean no bias",
                [
                    "run",
                    "comparisons",
                    "first shown wins",
                    "stage 1 predicts",
                    "positive wins shown first",
                    "positive wins shown second",
                ],  # fmt: skip
                [
                    [
                        str(b.run_id),
                        str(b.bias.n),
                        f"{b.bias.observed:.1%}",
                        f"{b.bias.expected:.1%}",
                        _share(b.bias.positive_first),
                        _share(b.bias.positive_second),
                    ]  # fmt: skip
                    for b in report.position_bias
                ],
                {1, 2, 3},
            )
        )
    if report.costs:
        blocks.append(
            Block(
                "Cost over each run's finished queries (GPU seconds: judge time the workers measured)",
                [
                    "run",
                    "judgments/query",
                    "max",
                    "failed",
                    "reused",
                    "GPU s/query",
                    "model revision",
                    "prompt sha256",
                ],  # fmt: skip
                [
                    [
                        str(c.run_id),
                        f"{c.judgments_per_query_mean:.1f}",
                        str(c.judgments_per_query_max),
                        str(c.failed_judgments),
                        str(c.reused_judgments),
                        f"{c.gpu_seconds_per_query:.3f}",
                        c.model_revision,
                        (c.prompt_sha256 or "-")[:12],
                    ]  # fmt: skip
                    for c in report.costs
                ],
                {1, 2, 3, 4, 5},
            )
        )
    if report.retrieval:
        blocks.append(
            Block(
                "Stage-1 retrieval over the whole gallery (Sample4Geo's counting: R@k and R@1% the positive "
                "alone, hit rate lets semi-positives rank above it)",
                [
                    "candidates",
                    "model",
                    "gallery",
                    "queries",
                    "R@1",
                    "R@5",
                    "R@10",
                    "R@1%",
                    "hit rate",
                    "skipped",
                ],
                [
                    [
                        (r.candidates or "-") + (" (random init)" if r.random_init else ""),
                        short_model(r.model),
                        str(r.gallery),
                        str(r.n_queries),
                        *(_num(r.recall[f"recall@{k}"], 2) for k in (1, 5, 10)),
                        _num(r.recall["recall@1%"], 2),
                        _num(r.hit_rate, 2),
                        str(r.skipped_images),
                    ]  # fmt: skip
                    for r in report.retrieval
                ],
                set(range(2, 10)),
            )
        )
    return blocks


def _share(p: Any) -> str:
    if not p.n:
        return "none"
    return f"{100 * p.estimate:.0f}% [{100 * p.low:.0f}, {100 * p.high:.0f}] of {p.n}"


def _table1(report: Report, level: str) -> Block:
    rows = list(report.table1_rows())
    body = [
        [
            "-" if isinstance(r, BaselineRow) else str(r.run_id),
            f"{r.query_set} ({r.n_queries})",
            str(r.k),
            method(r),
            "-" if isinstance(r, BaselineRow) else r.judge,
            "-" if isinstance(r, BaselineRow) else model_label(r),
            *(_recall_cell(r, k) for k in RECALL_KS),
        ]
        for r in rows
    ]
    first = 6
    bold = set()
    for members in _groups(rows).values():
        for j, k in enumerate(RECALL_KS):
            best = max(rows[i].recall_at(k).value for i in members)
            bold |= {(i, first + j) for i in members if rows[i].recall_at(k).value == best}
    return Block(
        f"Table 1. Recall@k (%) [{level} {INTERVAL_METHOD} interval]; best of each query set and K in bold",
        ["run", "query set (n)", "K", "method", "judge", "model", *(f"R@{k}" for k in RECALL_KS)],
        body,
        {2, *range(first, first + len(RECALL_KS))},
        bold,
        stacked=set(range(first, first + len(RECALL_KS))),
    )


def _groups(rows: list[BaselineRow | RunRow]) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault((r.query_set, r.k), []).append(i)
    return out


# ----------------------------------------------------------------------------------------------
# formats


def _table(report: Report, wide: bool = False) -> str:
    if not report.runs and not report.baselines and not report.retrieval:
        return "no runs or candidate sets stored yet"
    width = None if wide else TABLE_WIDTH
    out = [line for note in header_lines(report) for line in _wrap(f"note: {note}", width, indent=6)]
    for block in table_blocks(report):
        out += ["", *_wrap(block.caption, width), *_block_lines(block, width)]
    if not wide:
        out += ["", *_wrap(NARROW_FOOTNOTE, width)]
    return "\n".join(out)


def _wrap(text: str, width: int | None, indent: int = 0) -> list[str]:
    if width is None or len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=" " * indent, break_on_hyphens=False)


def _block_lines(block: Block, width: int | None) -> list[str]:
    """The block's header, rule and rows, aligned; within ``width`` (None: no limit) by stacking
    intervals and then wrapping the widest text columns, each row taking as many lines as its
    tallest cell."""
    body = block.body
    if width is not None:
        body = [
            [c.replace(" ", "\n", 1) if i in block.stacked else c for i, c in enumerate(row)] for row in body
        ]
    rows = [block.headers, *body]
    widths = [
        max(len(line) for row in rows for line in row[i].split("\n")) for i in range(len(block.headers))
    ]
    if width is not None:
        wrappable = [i for i in range(len(widths)) if i not in block.numeric and i not in block.stacked]
        while sum(widths) + 2 * (len(widths) - 1) > width:
            narrowable = [i for i in wrappable if widths[i] > MIN_WRAP]
            if not narrowable:
                break
            widths[max(narrowable, key=lambda i: widths[i])] -= 1

    def cell_lines(text: str, w: int) -> list[str]:
        return [part for line in text.split("\n") for part in (textwrap.wrap(line, w) or [""])]

    def lines(cells: list[str]) -> list[str]:
        columns = [cell_lines(c, w) for c, w in zip(cells, widths, strict=True)]
        return [
            "  ".join(
                (col[n] if n < len(col) else "").rjust(w)
                if i in block.numeric
                else (col[n] if n < len(col) else "").ljust(w)
                for i, (col, w) in enumerate(zip(columns, widths, strict=True))
            ).rstrip()
            for n in range(max(map(len, columns)))
        ]

    return [
        *lines(block.headers),
        "  ".join("-" * w for w in widths),
        *(line for row in body for line in lines(row)),
    ]


def _markdown(report: Report) -> str:
    if not report.runs and not report.baselines and not report.retrieval:
        return "_No runs or candidate sets stored yet._"
    out = [f"> {line}" for line in header_lines(report)]
    for block in table_blocks(report):
        align = ["---:" if i in block.numeric else "---" for i in range(len(block.headers))]
        out += ["", f"**{block.caption}.**", ""]
        out += ["| " + " | ".join(block.headers) + " |", "| " + " | ".join(align) + " |"]
        for i, cells in enumerate(block.body):
            shown = [f"**{c}**" if (i, j) in block.bold else c for j, c in enumerate(cells)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in shown) + " |")
    return "\n".join(out).rstrip() + "\n"


def csv_columns() -> list[str]:
    """Table 1 as CSV: the interval and test methods are named in the column names."""
    return [
        "kind", "run_id", "candidates", "query_set", "n_queries", "k", "strategy", "prompt", "judge", "model",
        "adapter", "adapter_sha256", "adapter_overlap", "status", "n_finished", "n_planned", "strategy_options", "judge_options",
        *(f"recall@{k}{part}" for k in RECALL_KS for part in ("", "_wilson_low", "_wilson_high")),
        *(f"{name}@{k}" for k in RECALL_KS
          for name in ("fixed", "broken", "delta", "delta_newcombe_low", "delta_newcombe_high", "p_mcnemar",
                       "p_holm")),
        "judgments_per_query_mean", "failed_judgments", "gpu_seconds_per_query", "model_revision",
        "prompt_sha256", "ece", "confidence",
    ]  # fmt: skip


def _csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buf.getvalue()


def csv_rows(report: Report) -> Iterable[dict[str, Any]]:
    costs = {c.run_id: c for c in report.costs}
    ece = {c.run_id: c.ece for c in report.calibration}
    versus = {(c.run_id, c.k): c for c in report.comparisons if c.against == "baseline"}
    for r in report.table1_rows():
        out: dict[str, Any] = {
            "kind": "baseline" if isinstance(r, BaselineRow) else "run",
            "candidates": r.candidates,
            "query_set": r.query_set,
            "n_queries": r.n_queries,
            "k": r.k,
            "confidence": report.confidence,
        }
        for rec in r.recall:
            out.update({f"recall@{rec.k}": rec.value, f"recall@{rec.k}_wilson_low": rec.low,
                        f"recall@{rec.k}_wilson_high": rec.high})  # fmt: skip
        if isinstance(r, RunRow):
            out.update(
                run_id=r.run_id, strategy=r.strategy, prompt=r.prompt, judge=r.judge, model=r.model,
                adapter=r.adapter, adapter_sha256=r.adapter_sha256, adapter_overlap=r.adapter_overlap,
                status=r.status, n_finished=r.n_finished, n_planned=r.n_planned,
                strategy_options=json.dumps(r.strategy_options, sort_keys=True),
                judge_options=json.dumps(r.judge_options, sort_keys=True), ece=ece.get(r.run_id),
            )  # fmt: skip
            for k in RECALL_KS:
                c = versus[(r.run_id, k)]
                out.update({f"fixed@{k}": c.fixed, f"broken@{k}": c.broken, f"delta@{k}": c.delta,
                            f"delta_newcombe_low@{k}": c.low, f"delta_newcombe_high@{k}": c.high,
                            f"p_mcnemar@{k}": c.p_value, f"p_holm@{k}": c.p_holm})  # fmt: skip
            if (cost := costs.get(r.run_id)) is not None:
                out.update(
                    judgments_per_query_mean=cost.judgments_per_query_mean,
                    failed_judgments=cost.failed_judgments,
                    gpu_seconds_per_query=cost.gpu_seconds_per_query,
                    model_revision=cost.model_revision,
                    prompt_sha256=cost.prompt_sha256,
                )
        yield out
