"""From the database to a ``Report``: every number of every output is computed here, once.

Each run is reported on the queries it finished, against the stage-1 baseline on those same
queries cut at the run's K (the view ``run_query_ranks`` does the cut). Runs that finished the
same queries share a query set ("Q1", ...) and, at one K, a baseline row; ``common=True``
restricts every row of a candidate set to the queries all of its reported runs finished.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from sqlalchemy.orm import Session

from db import reports
from orchestrator.reporting import stats
from orchestrator.reporting.rows import (
    ADJUSTMENT_METHOD,
    DIFFERENCE_METHOD,
    INTERVAL_METHOD,
    OVERLAP_MARK,
    RECALL_KS,
    TEST_METHOD,
    BaselineRow,
    CalibrationRow,
    ComparisonRow,
    CostRow,
    PositionBiasRow,
    QuerySet,
    Recall,
    Report,
    RetrievalRow,
    RunRow,
)
from workers.prompts import SPECS

Ranks = dict[int, tuple[int | None, int | None]]  # query id -> (final rank, stage-1 rank within K)


class ReportError(ValueError):
    pass


def build_report(
    s: Session,
    run_ids: Sequence[int] | None = None,
    *,
    common: bool = False,
    confidence: float = stats.DEFAULT_CONFIDENCE,
) -> Report:
    """The report of ``run_ids`` (None or empty: every run and candidate set stored)."""
    if run_ids:
        missing = sorted(set(run_ids) - reports.existing_run_ids(s, run_ids))
        if missing:
            raise ReportError(f"no run with id {', '.join(map(str, missing))}")
        ids = list(dict.fromkeys(run_ids))
    else:
        ids = reports.all_run_ids(s)
    meta = {r["run_id"]: r for r in reports.runs(s, ids)}
    ranks: dict[int, Ranks] = defaultdict(dict)
    for h in reports.run_query_hits(s, ids):
        ranks[h["run_id"]][h["query_id"]] = (h["final_rank"], h["stage1_rank"])
    active = [i for i in ids if ranks.get(i)]
    idle = [i for i in ids if not ranks.get(i)]
    if common:
        _restrict_to_common_queries(meta, ranks, active)

    query_sets, label_of = _query_sets(meta, ranks, active)
    baselines: dict[tuple[str, int], BaselineRow] = {}
    run_rows = []
    for run_id in active:
        m, q = meta[run_id], ranks[run_id]
        label = label_of[run_id]
        if (label, m["k"]) not in baselines:
            baselines[(label, m["k"])] = BaselineRow(
                m["candidate_set_id"], m["candidates"], label, m["k"], len(q),
                _recalls([r[1] for r in q.values()], confidence),
            )  # fmt: skip
        run_rows.append(_run_row(m, q, label, confidence))
    if not run_ids:  # candidate sets no run touched: their baseline over all their queries
        touched = {meta[i]["candidate_set_id"] for i in active}
        rest = [c for c in reports.all_candidate_set_ids(s) if c not in touched]
        by_set: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for h in reports.candidate_set_query_hits(s, rest):
            by_set[h["candidate_set_id"]].append(h)
        for cs_id, hits in by_set.items():
            label = f"Q{len(query_sets) + 1}"
            query_sets.append(QuerySet(label, cs_id, hits[0]["candidates"], len(hits), ()))
            baselines[(label, hits[0]["k"])] = BaselineRow(
                cs_id, hits[0]["candidates"], label, hits[0]["k"], len(hits),
                _recalls([h["stage1_rank"] for h in hits], confidence),
            )  # fmt: skip

    comparisons = _comparisons(run_rows, ranks, confidence)
    sets = {r.candidate_set_id for r in run_rows} if run_ids else None
    report = Report(
        confidence=confidence,
        common=common,
        query_sets=tuple(query_sets),
        baselines=tuple(baselines.values()),
        runs=tuple(run_rows),
        comparisons=comparisons,
        costs=_costs(s, active),
        calibration=_calibration(s, run_rows, confidence),
        position_bias=_position_bias(s, run_rows, confidence),
        retrieval=_retrieval(s, sorted(sets) if sets is not None else None),
        notes=(),
    )
    return _with_notes(report, idle)


def _recalls(ranks: Sequence[int | None], confidence: float) -> tuple[Recall, ...]:
    out = []
    for k in RECALL_KS:
        hits = sum(stats.hits_at(ranks, k))
        ci = stats.wilson(hits, len(ranks), confidence)
        out.append(Recall(k, hits, len(ranks), 100.0 * ci.estimate, 100.0 * ci.low, 100.0 * ci.high))
    return tuple(out)


def judge_settings(m: dict[str, Any]) -> dict[str, Any]:
    """The judge's complete settings as the run stored them: its own options (defaults filled in
    at submit), the batch size and, for pairwise prompts, the decode mode."""
    params = m["params"]
    out = dict(params.get("judge_options", {}))
    spec = SPECS.get(m["prompt_name"])
    if spec is not None and spec.kind == "pairwise" and "decode" in params:
        out["decode"] = params["decode"]
    out["batch_size"] = m["batch_size"]
    return out


def _run_row(m: dict[str, Any], q: Ranks, label: str, confidence: float) -> RunRow:
    params = m["params"]
    adapter = params.get("adapter") or {}  # submit --adapter: {"name", "sha256", "overlap"}
    return RunRow(
        run_id=m["run_id"],
        candidate_set_id=m["candidate_set_id"],
        candidates=m["candidates"],
        query_set=label,
        k=m["k"],
        strategy=m["strategy"],
        prompt=m["prompt_name"],
        judge=m["judge"],
        model=m["model"],
        status=m["status"],
        n_planned=m["n_planned"],
        n_finished=m["n_finished"],
        n_queries=len(q),
        strategy_options=dict(params.get("strategy_options", {})),
        judge_options=judge_settings(m),
        recall=_recalls([r[0] for r in q.values()], confidence),
        adapter=adapter.get("name"),
        adapter_sha256=adapter.get("sha256"),
        adapter_overlap=int(adapter.get("overlap") or 0),
    )


def _restrict_to_common_queries(
    meta: dict[int, dict[str, Any]], ranks: dict[int, Ranks], active: list[int]
) -> None:
    by_set: dict[int, list[int]] = defaultdict(list)
    for run_id in active:
        by_set[meta[run_id]["candidate_set_id"]].append(run_id)
    for group in by_set.values():
        shared = set.intersection(*(set(ranks[i]) for i in group))
        if not shared:
            raise ReportError(
                f"runs {', '.join(map(str, group))} of candidate set {meta[group[0]]['candidates']!r} share no "
                "finished query, so --common has nothing to compare; leave it out or report them apart"
            )
        for run_id in group:
            ranks[run_id] = {q: r for q, r in ranks[run_id].items() if q in shared}


def _query_sets(
    meta: dict[int, dict[str, Any]], ranks: dict[int, Ranks], active: list[int]
) -> tuple[list[QuerySet], dict[int, str]]:
    """Label each distinct (candidate set, queries) in run order: Q1, Q2, ..."""
    groups: dict[tuple[int, frozenset[int]], list[int]] = {}
    for run_id in active:
        groups.setdefault((meta[run_id]["candidate_set_id"], frozenset(ranks[run_id])), []).append(run_id)
    out, label_of = [], {}
    for n, ((cs_id, queries), group) in enumerate(groups.items(), start=1):
        out.append(QuerySet(f"Q{n}", cs_id, meta[group[0]]["candidates"], len(queries), tuple(group)))
        label_of.update({run_id: f"Q{n}" for run_id in group})
    return out, label_of


def _comparisons(
    runs: Sequence[RunRow], ranks: dict[int, Ranks], confidence: float
) -> tuple[ComparisonRow, ...]:
    """Every run against its baseline and against each other run on the same queries, at every k;
    exact McNemar p-values, Holm-adjusted over the whole family."""
    raw: list[tuple[int, str, int | None, int, stats.PairedDifference]] = []
    for r in runs:
        q = sorted(ranks[r.run_id])
        final = [ranks[r.run_id][i][0] for i in q]
        stage1 = [ranks[r.run_id][i][1] for i in q]
        for k in RECALL_KS:
            d = stats.paired_difference(stats.hits_at(final, k), stats.hits_at(stage1, k), confidence)
            raw.append((r.run_id, "baseline", None, k, d))
    for a, b in combinations(runs, 2):
        if a.query_set != b.query_set:
            continue
        q = sorted(ranks[a.run_id])
        for k in RECALL_KS:
            d = stats.paired_difference(
                stats.hits_at([ranks[a.run_id][i][0] for i in q], k),
                stats.hits_at([ranks[b.run_id][i][0] for i in q], k),
                confidence,
            )
            raw.append((a.run_id, f"run {b.run_id}", b.run_id, k, d))
    adjusted = stats.holm([d.p_value for *_, d in raw])
    return tuple(
        ComparisonRow(
            run_id,
            against,
            against_id,
            k,
            d.n,
            d.only_a,
            d.only_b,
            100.0 * d.estimate,
            100.0 * d.low,
            100.0 * d.high,
            d.p_value,
            p_holm,
        )  # fmt: skip
        for (run_id, against, against_id, k, d), p_holm in zip(raw, adjusted, strict=True)
    )


def _costs(s: Session, run_ids: Sequence[int]) -> tuple[CostRow, ...]:
    out = []
    for run_id, c in reports.run_cost(s, run_ids).items():
        out.append(
            CostRow(
                run_id=run_id,
                n_queries=c["n_queries"],
                judgments_per_query_mean=float(c["judgments_per_query_mean"]),
                judgments_per_query_max=int(c["judgments_per_query_max"]),
                judgments=int(c["judgments"]),
                failed_judgments=int(c["failed_judgments"]),
                reused_judgments=int(c["reused_judgments"]),
                # Rounded: the database sums float latencies in no fixed order (last bits vary).
                gpu_seconds_per_query=round(float(c["gpu_seconds_per_query"]), 6),
                # As the workers resolved it; the run's requested revision when nothing ran.
                model_revision=", ".join(c["judgment_revisions"]) or c["run_revision"],
                prompt_sha256=c["prompt_sha256"],
            )
        )
    return tuple(out)


def _calibration(s: Session, runs: Sequence[RunRow], confidence: float) -> tuple[CalibrationRow, ...]:
    prompt = {r.run_id: r.prompt for r in runs}
    ids = [r.run_id for r in runs]
    pointwise: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in reports.pointwise_scores(s, ids):
        pointwise[row["run_id"]].append(row)
    pairwise: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in reports.pairwise_probabilities(s, ids):
        pairwise[row["run_id"]].append(row)
    out = []
    for run_id in ids:
        if pointwise.get(run_id):
            rows = pointwise[run_id]
            probs = [stats.score_as_probability(r["score"], prompt[run_id]) for r in rows]
            per_query: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
            for r in rows:
                per_query[r["query_id"]][0 if r["positive"] else 1].append(float(r["score"]))
            rel = stats.reliability(probs, [int(r["positive"]) for r in rows], confidence=confidence)
            out.append(
                CalibrationRow(
                    run_id, "pointwise", rel.n, rel.ece, rel.bins, stats.within_query_auc(per_query.values())
                )
            )
        if pairwise.get(run_id):
            rows = [r for r in pairwise[run_id] if r["p_first"] + r["p_second"] > 0]
            if rows:
                probs = [r["p_first"] / (r["p_first"] + r["p_second"]) for r in rows]
                rel = stats.reliability(
                    probs, [int(r["first_positive"]) for r in rows], confidence=confidence
                )
                out.append(CalibrationRow(run_id, "pairwise", rel.n, rel.ece, rel.bins))
    return tuple(out)


def _position_bias(s: Session, runs: Sequence[RunRow], confidence: float) -> tuple[PositionBiasRow, ...]:
    counts: dict[int, list[stats.PairCount]] = defaultdict(list)
    for r in reports.position_counts(s, [r.run_id for r in runs]):
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
    shares = reports.positive_rank_shares(s, sorted({r.candidate_set_id for r in runs}))
    return tuple(
        PositionBiasRow(
            r.run_id, stats.position_bias(counts[r.run_id], shares.get(r.candidate_set_id, {}), confidence)
        )
        for r in runs
        if counts.get(r.run_id)
    )


def _retrieval(s: Session, candidate_set_ids: Sequence[int] | None) -> tuple[RetrievalRow, ...]:
    return tuple(
        RetrievalRow(
            retrieval_run_id=r["retrieval_run_id"],
            name=r["name"],
            candidate_set_id=r["candidate_set_id"],
            candidates=r["candidates"],
            model=r["model"],
            random_init=bool(r["random_init"]),
            status=r["status"],
            gallery=r["n_gallery"],
            one_percent_k=r["one_percent_k"],
            n_queries=r["n_queries"],
            recall={
                **{f"recall@{k}": r[f"recall_at_{k}"] for k in RECALL_KS},
                "recall@1%": r["recall_at_1pct"],
            },
            hit_rate=r["hit_rate"],
            skipped_images=r["skipped_images"],
            skipped_tiles=r["skipped_tiles"],
            skipped_queries=r["skipped_queries"],
        )
        for r in reports.retrieval_recall(s, candidate_set_ids=candidate_set_ids)
    )


def _with_notes(report: Report, idle: Sequence[int]) -> Report:
    n_tests = len(report.comparisons)
    level = f"{report.confidence:.0%}"
    notes = [
        f"Recall@k (%) with {level} {INTERVAL_METHOD} intervals over queries; a positive beyond a run's K "
        "is a miss, for the run and for its baseline.",
    ]
    if n_tests:
        notes.append(
            f"Differences: {level} {DIFFERENCE_METHOD} intervals; p-values two-sided, {TEST_METHOD} on the "
            f"queries where the two differ; {ADJUSTMENT_METHOD}-adjusted over the {n_tests} tests of this report."
        )
    if report.common:
        notes.append(
            "--common: every row of a candidate set is on the queries all of its reported runs finished."
        )
    sets_per_cs: dict[int, list[QuerySet]] = defaultdict(list)
    for qs in report.query_sets:
        sets_per_cs[qs.candidate_set_id].append(qs)
    for group in sets_per_cs.values():
        if len(group) > 1:
            notes.append(
                f"candidate set {group[0].candidates!r}: rows are on {len(group)} different query sets ("
                + "; ".join(
                    f"{qs.label}: {qs.n_queries} queries, "
                    + (f"run {', '.join(map(str, qs.run_ids))}" if qs.run_ids else "all of the set")
                    for qs in group
                )
                + "); compare rows only within a query set, or pass --common"
            )
    for r in report.runs:
        if r.adapter_overlap > 0:
            notes.append(
                f"{OVERLAP_MARK} run {r.run_id}: {r.adapter_overlap} of its queries were in adapter {r.adapter}'s "
                "training or validation queries (submitted with --allow-overlap)"
            )
    if idle:
        notes.append(f"left out (no finished query yet): run {', '.join(map(str, idle))}")
    return dataclasses.replace(report, notes=tuple(notes))
