"""Table 1 style report: Recall@1/3/5/10 per run and for the stage-1 baseline, from SQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from db import reports
from db.reports import RECALL_KS

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


class ReportError(ValueError):
    pass


def report_rows(s: Session, run_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Baseline rows (one per candidate set, on the reported runs' queries) then one row per run."""
    if run_ids:
        missing = sorted(set(run_ids) - reports.existing_run_ids(s, run_ids))
        if missing:
            raise ReportError(f"no run with id {', '.join(map(str, missing))}")
        ids = list(dict.fromkeys(run_ids))
    else:
        ids = reports.all_run_ids(s)
    rows: list[dict[str, Any]] = []
    baseline = reports.baseline_on_run_queries(s, ids)
    covered = {b["candidate_set_id"] for b in baseline}
    if not run_ids:  # candidate sets no run touched yet: their baseline over all their queries
        rest = [c for c in reports.all_candidate_set_ids(s) if c not in covered]
        baseline += reports.candidate_set_recall(s, rest)
    for b in baseline:
        rows.append(
            {
                "run_id": None,
                "candidates": b["name"],
                "strategy": "baseline",
                "prompt": None,
                "judge": None,
                "model": None,
                "n_queries": b["n_queries"],
                **{f"recall@{k}": b[f"recall_at_{k}"] for k in RECALL_KS},
            }
        )
    for r in reports.run_recall(s, ids):
        rows.append(
            {
                "run_id": r["run_id"],
                "candidates": r["candidates"],
                "strategy": r["strategy"],
                "prompt": r["prompt_name"],
                "judge": r["judge"],
                "model": r["model"],
                "n_queries": r["n_queries"],
                **{f"recall@{k}": r[f"recall_at_{k}"] for k in RECALL_KS},
                "status": r["status"],
                "n_planned": r["n_planned"],
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "table":
        return _table(rows)
    raise ReportError(f"unknown format {fmt!r}")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs or candidate sets stored yet"
    headers = ["run", "candidates", "method", "judge", "model", "queries", *[f"R@{k}" for k in RECALL_KS]]
    body = []
    for r in rows:
        method = "baseline (stage 1)" if r["strategy"] == "baseline" else f"{r['strategy']}/{r['prompt']}"
        queries = str(r["n_queries"])
        if r.get("n_planned") and r["n_planned"] != r["n_queries"]:
            queries += f"/{r['n_planned']}"
        body.append(
            [
                _cell(r["run_id"]),
                r["candidates"],
                method,
                _cell(r["judge"]),
                _cell(r["model"]),
                queries,
                *[_cell(r[f"recall@{k}"]) for k in RECALL_KS],
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    numeric = set(range(5, len(headers)))

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(b) for b in body)])
