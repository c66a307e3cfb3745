"""Table 1 style report: Recall@1/3/5/10 per run and for the stage-1 baseline, from SQL.

Each recall carries a seeded percentile-bootstrap interval over queries; each run is paired with
the baseline on the same queries (exact McNemar on top-1 hits, paired bootstrap on R@k
differences) and costed (judgments per query, failures, judge seconds, revision, prompt hash).
Runs of one candidate set that finished different query sets are compared only on the queries
all of them finished, and the report says so. The statistics are ``orchestrator/stats.py``.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db import reports
from db.reports import RECALL_KS
from orchestrator import stats

COLUMNS = [
    "run_id",
    "candidates",
    "strategy",
    "prompt",
    "judge",
    "model",
    "n_queries",
    *[f"recall@{k}" for k in RECALL_KS],
]


# Columns added by the statistics, in the CSV after COLUMNS (JSON rows carry the same keys).
STAT_COLUMNS = [
    *[f"recall@{k}_ci_{end}" for k in RECALL_KS for end in ("low", "high")],
    "n_finished",
    "top1_fixed",
    "top1_broken",
    "mcnemar_p",
    *[f"delta@{k}{part}" for k in RECALL_KS for part in ("", "_ci_low", "_ci_high", "_p")],
    "judgments_per_query_mean",
    "judgments_per_query_max",
    "failed_judgments",
    "reused_judgments",
    "gpu_seconds_per_query",
    "model_revision",
    "prompt_sha256",
]
FORMATS = ("table", "markdown", "csv", "json")


class ReportError(ValueError):
    pass


def report_rows(
    s: Session,
    run_ids: Sequence[int] | None = None,
    *,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Baseline rows (one per candidate set, on the reported runs' queries) then one row per run.

    Every row of a candidate set covers the queries all of its reported runs finished; recalls
    are percentages with ``confidence`` bootstrap intervals (``n_resamples``, ``seed``).
    """
    if run_ids:
        missing = sorted(set(run_ids) - reports.existing_run_ids(s, run_ids))
        if missing:
            raise ReportError(f"no run with id {', '.join(map(str, missing))}")
        ids = list(dict.fromkeys(run_ids))
    else:
        ids = reports.all_run_ids(s)
    rows: list[dict[str, Any]] = []
    baseline = reports.baseline_on_shared_queries(s, ids)
    covered = {b["candidate_set_id"] for b in baseline}
    _refuse_disjoint_runs(s, ids, covered)
    if not run_ids:  # candidate sets no run touched yet: their baseline over all their queries
        rest = [c for c in reports.all_candidate_set_ids(s) if c not in covered]
        baseline += reports.candidate_set_recall(s, rest)
    for b in baseline:
        rows.append(
            {
                "run_id": None,
                "candidate_set_id": b["candidate_set_id"],
                "candidates": b["name"],
                "strategy": "baseline",
                "prompt": None,
                "judge": None,
                "model": None,
                "n_queries": b["n_queries"],
                **{f"recall@{k}": b[f"recall_at_{k}"] for k in RECALL_KS},
            }
        )
    params = {r["run_id"]: r["params"] for r in reports.runs(s, ids)}
    for r in reports.run_recall_on_shared_queries(s, ids):
        options = params.get(r["run_id"], {})
        rows.append(
            {
                "run_id": r["run_id"],
                "candidate_set_id": r["candidate_set_id"],
                "candidates": r["candidates"],
                "strategy": r["strategy"],
                "prompt": r["prompt_name"],
                "judge": r["judge"],
                "model": r["model"],
                "n_queries": r["n_queries"],
                **{f"recall@{k}": r[f"recall_at_{k}"] for k in RECALL_KS},
                "status": r["status"],
                "n_planned": r["n_planned"],
                "judge_options": options.get("judge_options", {}),
                "strategy_options": options.get("strategy_options", {}),
            }
        )
    add_statistics(s, rows, ids, n_resamples=n_resamples, confidence=confidence, seed=seed)
    # Stage-1 retrieval runs over the whole gallery (R@1%, hit rate): those behind the reported runs.
    sets = {r["candidate_set_id"] for r in rows} if run_ids else None
    rows.extend(reports.retrieval_report_rows(s, sorted(sets) if sets is not None else None))
    return rows


def add_statistics(
    s: Session,
    rows: list[dict[str, Any]],
    run_ids: Sequence[int],
    *,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> None:
    """Add, in place, intervals to every recall and the paired tests and cost to every run row."""
    settings = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    per_run: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for h in reports.run_query_hits(s, run_ids):
        per_run[h["run_id"]].append(h)
    per_set: dict[int, list[int | None]] = defaultdict(list)
    for h in reports.baseline_query_hits(s, run_ids):
        per_set[h["candidate_set_id"]].append(h["stage1_rank"])
    untouched = [
        r["candidate_set_id"]
        for r in rows
        if r.get("strategy") == "baseline" and r.get("candidate_set_id") not in per_set
    ]
    for h in reports.candidate_set_query_hits(s, untouched):
        per_set[h["candidate_set_id"]].append(h["stage1_rank"])
    finished = {f["run_id"]: f["n_finished"] for f in reports.finished_queries(s, run_ids)}
    cost = reports.run_cost(s, run_ids)
    for row in rows:
        if row.get("strategy") == "baseline":
            if per_set.get(row.get("candidate_set_id")):
                _add_intervals(row, per_set[row["candidate_set_id"]], settings)
            continue
        queries = per_run.get(row.get("run_id"))
        if not queries:
            continue
        final = [q["final_rank"] for q in queries]
        stage1 = [q["stage1_rank"] for q in queries]
        _add_intervals(row, final, settings)
        row["n_finished"] = finished.get(row["run_id"])
        top1 = stats.mcnemar(stats.hits_at(final, 1), stats.hits_at(stage1, 1))
        row.update(top1_fixed=top1.only_a, top1_broken=top1.only_b, mcnemar_p=top1.p_value)
        for k in RECALL_KS:
            d = stats.paired_bootstrap(stats.hits_at(final, k), stats.hits_at(stage1, k), **settings)
            row[f"delta@{k}"] = 100.0 * d.estimate
            row[f"delta@{k}_ci_low"] = 100.0 * d.low
            row[f"delta@{k}_ci_high"] = 100.0 * d.high
            row[f"delta@{k}_p"] = d.p_value
        c = cost.get(row["run_id"])
        if c is not None:
            row.update(
                judgments_per_query_mean=c["judgments_per_query_mean"],
                judgments_per_query_max=c["judgments_per_query_max"],
                failed_judgments=c["failed_judgments"],
                reused_judgments=c["reused_judgments"],
                gpu_seconds_per_query=c["gpu_seconds_per_query"],
                # As the workers resolved it; the run's requested revision when nothing ran.
                model_revision=", ".join(c["judgment_revisions"]) or c["run_revision"],
                prompt_sha256=c["prompt_sha256"],
            )


def _add_intervals(row: dict[str, Any], ranks: list[int | None], settings: dict[str, Any]) -> None:
    for k in RECALL_KS:
        ci = stats.bootstrap_mean(stats.hits_at(ranks, k), **settings)
        row[f"recall@{k}_ci_low"] = 100.0 * ci.low
        row[f"recall@{k}_ci_high"] = 100.0 * ci.high


def _refuse_disjoint_runs(s: Session, run_ids: Sequence[int], covered: set[int]) -> None:
    """Runs of one candidate set without a single query in common cannot be compared."""
    by_set: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for f in reports.finished_queries(s, run_ids):
        if f["n_finished"]:
            by_set[f["candidate_set_id"]].append(f)
    for cs_id, group in by_set.items():
        if cs_id not in covered and len(group) > 1:
            runs = ", ".join(str(f["run_id"]) for f in group)
            raise ReportError(
                f"runs {runs} of candidate set {group[0]['candidates']!r} share no finished query, "
                "so they cannot be compared; report them one at a time"
            )


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    notes: list[str]


def build_report(
    s: Session,
    run_ids: Sequence[int] | None = None,
    *,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Report:
    """Table 1 rows plus what a reader must know about them (restricted query sets, left-out runs)."""
    rows = report_rows(s, run_ids, n_resamples=n_resamples, confidence=confidence, seed=seed)
    ids = list(dict.fromkeys(run_ids)) if run_ids else reports.all_run_ids(s)
    notes = [
        f"{confidence:.0%} confidence intervals: percentile bootstrap over queries "
        f"({n_resamples:,} resamples, seed {seed}); p-values two-sided."
    ]
    idle = [f["run_id"] for f in reports.finished_queries(s, ids) if not f["n_finished"]]
    if idle:
        notes.append(f"left out (no finished query yet): run {', '.join(map(str, idle))}")
    by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("n_finished") is not None:
            by_set[r["candidates"]].append(r)
    for name, group in by_set.items():
        if any(r["n_finished"] != r["n_queries"] for r in group):
            sizes = ", ".join(f"run {r['run_id']}: {r['n_finished']}" for r in group)
            notes.append(
                f"the runs of candidate set {name!r} finished different query sets ({sizes} queries); "
                f"every {name!r} row, the baseline included, uses only the {group[0]['n_queries']} "
                "queries all of them finished"
            )
    return Report(rows, notes)


def prepare_out_dir(path: Path) -> Path:
    """Create ``path`` if needed and make sure files can be written there; else a ReportError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cvgl-write-check-"):
            pass
    except OSError as exc:
        raise ReportError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    return path


REPORT_FILES = {"table": "table1.txt", "markdown": "table1.md", "csv": "table1.csv", "json": "table1.json"}


def write_report_files(report: Report, out_dir: Path) -> list[Path]:
    """Table 1 in every format under ``out_dir`` (prepared by ``prepare_out_dir``)."""
    written = []
    for fmt, name in REPORT_FILES.items():
        path = out_dir / name
        path.write_text(format_rows(report.rows, fmt, report.notes) + "\n")
        written.append(path)
    return written


def format_rows(rows: list[dict[str, Any]], fmt: str, notes: Sequence[str] = ()) -> str:
    """Render the rows; ``notes`` follow the human formats (csv and json stay machine-readable)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        fields = [*COLUMNS, *(c for c in STAT_COLUMNS if c not in COLUMNS)]
        if any(r.get("strategy") == "retrieval" for r in rows):
            fields += ["recall@1%", "hit_rate", "skipped_images", "gallery", "random_init"]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "table":
        return _table(rows, notes)
    if fmt == "markdown":
        return _markdown(rows, notes)
    raise ReportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _p(p: float | None, prefix: str = "") -> str:
    """A p-value to three decimals; ``prefix`` "p" gives "p=0.070" / "p<0.001"."""
    if p is None:
        return "-"
    if p < 0.001:
        return f"{prefix}<0.001"
    return f"{prefix}{'=' if prefix else ''}{p:.3f}"


def _recall(r: dict[str, Any], k: int) -> str:
    value = _cell(r.get(f"recall@{k}"))
    low, high = r.get(f"recall@{k}_ci_low"), r.get(f"recall@{k}_ci_high")
    return value if low is None or high is None else f"{value} [{low:.1f}, {high:.1f}]"


def _delta(r: dict[str, Any], k: int) -> str:
    d = r.get(f"delta@{k}")
    if d is None:
        return "-"
    low, high = r[f"delta@{k}_ci_low"], r[f"delta@{k}_ci_high"]
    return f"{d:+.2f} [{low:+.1f}, {high:+.1f}] {_p(r[f'delta@{k}_p'], 'p')}"


def _method(r: dict[str, Any]) -> str:
    if r["strategy"] == "retrieval":
        return "retrieval (whole gallery)" + (", random init" if r.get("random_init") else "")
    if r["strategy"] == "baseline":
        return "baseline (stage 1)"
    return f"{r['strategy']}/{r.get('prompt')}" + options_label(r.get("strategy_options"))


def options_label(options: dict[str, Any] | None) -> str:
    """" (accuracy=0.9, both_orders=True)": what tells two runs of one strategy and model apart."""
    shown = {k: v for k, v in (options or {}).items() if k != "seed"}  # the seed is the run's own
    return f" ({', '.join(f'{k}={v}' for k, v in sorted(shown.items()))})" if shown else ""


def model_label(r: dict[str, Any]) -> str:
    """The model with the judge options that change its answers (the simulated judge's accuracy)."""
    return _cell(r.get("model")) + options_label(r.get("judge_options"))


def _queries(r: dict[str, Any]) -> str:
    queries = str(r["n_queries"])
    if r.get("n_planned") and r["n_planned"] != r["n_queries"]:
        queries += f"/{r['n_planned']}"
    return queries


def table_blocks(rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """(caption, headers, body, numeric columns) of Table 1, the paired tests and the cost."""
    table1 = [
        [
            _cell(r.get("run_id")),
            _cell(r.get("candidates")),
            _method(r),
            _cell(r.get("judge")),
            model_label(r),
            _queries(r),
            *[_recall(r, k) for k in RECALL_KS],
        ]
        for r in rows
    ]
    blocks = [
        (
            "Table 1. Recall@k (%) [confidence interval]",
            ["run", "candidates", "method", "judge", "model", "queries", *[f"R@{k}" for k in RECALL_KS]],
            table1,
            set(range(5, 6 + len(RECALL_KS))),
        )
    ]
    tested = [r for r in rows if r.get("mcnemar_p") is not None]
    if tested:
        blocks.append(
            (
                "Each run against the stage-1 baseline on the same queries: top-1 by exact McNemar, "
                "R@k difference (percentage points) by paired bootstrap",
                [
                    "run",
                    "method",
                    "queries",
                    "top-1 fixed",
                    "top-1 broken",
                    "McNemar p",
                    *[f"ΔR@{k}" for k in RECALL_KS],
                ],
                [
                    [
                        _cell(r["run_id"]),
                        _method(r),
                        str(r["n_queries"]),
                        str(r["top1_fixed"]),
                        str(r["top1_broken"]),
                        _p(r["mcnemar_p"]),
                        *[_delta(r, k) for k in RECALL_KS],
                    ]
                    for r in tested
                ],
                set(range(2, 6 + len(RECALL_KS))),
            )
        )
    costed = [r for r in rows if r.get("judgments_per_query_mean") is not None]
    if costed:
        blocks.append(
            (
                "Cost over each run's finished queries (GPU seconds: judge time the workers measured)",
                [
                    "run",
                    "method",
                    "judgments/query",
                    "max",
                    "failed",
                    "reused",
                    "GPU s/query",
                    "model revision",
                    "prompt sha256",
                ],
                [
                    [
                        _cell(r["run_id"]),
                        _method(r),
                        f"{r['judgments_per_query_mean']:.1f}",
                        str(r["judgments_per_query_max"]),
                        str(r["failed_judgments"]),
                        str(r["reused_judgments"]),
                        f"{r['gpu_seconds_per_query']:.3f}",
                        _cell(r.get("model_revision")),
                        (r.get("prompt_sha256") or "-")[:12],
                    ]
                    for r in costed
                ],
                {2, 3, 4, 5, 6},
            )
        )
    retrieved = [r for r in rows if r.get("strategy") == "retrieval"]
    if retrieved:
        blocks.append(
            (
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
                        _cell(r["candidates"]) + (" (random init)" if r.get("random_init") else ""),
                        _cell(r["model"]),
                        _cell(r["gallery"]),
                        str(r["n_queries"]),
                        *[_cell(r.get(f"recall@{k}")) for k in (1, 5, 10)],
                        _cell(r["recall@1%"]),
                        _cell(r["hit_rate"]),
                        str(r["skipped_images"]),
                    ]
                    for r in retrieved
                ],
                set(range(2, 10)),
            )
        )
    return blocks


def _table(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "no runs or candidate sets stored yet"
    out: list[str] = []
    for caption, headers, body, numeric in table_blocks(rows):
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

        def line(cells: list[str], widths=widths, numeric=numeric) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        if out:
            out.append("")
        out.append(caption)
        out.extend([line(headers), line(["-" * w for w in widths]), *(line(b) for b in body)])
    out.extend(["", *(f"note: {n}" for n in notes)] if notes else [])
    return "\n".join(out)


def _markdown(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "_No runs or candidate sets stored yet._"
    best = {}
    for k in RECALL_KS:
        values = [r[f"recall@{k}"] for r in rows if r.get(f"recall@{k}") is not None]
        best[k] = max(values) if values else None
    out: list[str] = []
    for caption, headers, body, numeric in table_blocks(rows):
        if caption.startswith("Table 1"):
            # The paper sets the best result of each metric in bold.
            first_recall = headers.index(f"R@{RECALL_KS[0]}")
            for r, cells in zip(rows, body, strict=True):
                for j, k in enumerate(RECALL_KS):
                    if best[k] is not None and r.get(f"recall@{k}") == best[k]:
                        cells[first_recall + j] = f"**{cells[first_recall + j]}**"
        align = ["---:" if i in numeric else "---" for i in range(len(headers))]
        out += [f"**{caption}.**", ""]
        out += ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        out.append("")
    out += [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"
