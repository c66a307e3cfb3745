"""The report as typed rows: one record type per kind of row, computed once by ``build.py`` and
rendered by ``render.py`` (table, markdown, CSV, JSON), ``page.py`` (HTML) and ``figures.py``.

Recalls and differences are percentages; probabilities (p-values, calibration) are fractions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.reporting.stats import PositionBias, ReliabilityBin

RECALL_KS = (1, 3, 5, 10)
INTERVAL_METHOD = "Wilson score"
DIFFERENCE_METHOD = "Newcombe paired (square-and-add)"
TEST_METHOD = "exact McNemar"
ADJUSTMENT_METHOD = "Holm"
# After the model of a run whose adapter saw some of its queries in training (--allow-overlap).
OVERLAP_MARK = "†"


@dataclass(frozen=True)
class Recall:
    """R@k (%) of ``n`` queries, ``hits`` of them, with its interval (``INTERVAL_METHOD``)."""

    k: int
    hits: int
    n: int
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class QuerySet:
    """The queries a group of rows is computed on: a label ("Q1"), its candidate set and size."""

    label: str
    candidate_set_id: int
    candidates: str
    n_queries: int
    run_ids: tuple[int, ...]  # the runs computed on exactly these queries (none: a candidate set alone)


@dataclass(frozen=True)
class BaselineRow:
    """Stage-1 order on one query set, the positive counted only within the first ``k`` candidates."""

    candidate_set_id: int
    candidates: str
    query_set: str
    k: int
    n_queries: int
    recall: tuple[Recall, ...]

    def recall_at(self, k: int) -> Recall:
        return _recall_at(self.recall, k)


@dataclass(frozen=True)
class RunRow:
    """One reranking run on its query set, with everything that tells two runs apart."""

    run_id: int
    candidate_set_id: int
    candidates: str
    query_set: str
    k: int
    strategy: str
    prompt: str
    judge: str
    model: str
    status: str
    n_planned: int
    n_finished: int
    n_queries: int
    strategy_options: dict[str, Any]
    judge_options: dict[str, Any]  # complete: the judge's own options plus decode mode and batch size
    recall: tuple[Recall, ...]
    # A fine-tuned judge (``submit --adapter``): the adapter's name and content hash, and how many
    # of the run's queries it saw in training or validation (more than 0 only with --allow-overlap).
    adapter: str | None = None
    adapter_sha256: str | None = None
    adapter_overlap: int = 0

    def recall_at(self, k: int) -> Recall:
        return _recall_at(self.recall, k)


@dataclass(frozen=True)
class ComparisonRow:
    """R@k of ``run_id`` minus that of ``against`` ("baseline" or "run N") on the same ``n`` queries."""

    run_id: int
    against: str
    against_run_id: int | None
    k: int
    n: int
    fixed: int  # queries the run hits at k and the other misses
    broken: int  # queries the other hits at k and the run misses
    delta: float
    low: float
    high: float
    p_value: float  # TEST_METHOD on the fixed and broken queries
    p_holm: float  # ADJUSTMENT_METHOD over every comparison of the report


@dataclass(frozen=True)
class CostRow:
    run_id: int
    n_queries: int
    judgments_per_query_mean: float
    judgments_per_query_max: int
    judgments: int
    failed_judgments: int
    reused_judgments: int
    gpu_seconds_per_query: float
    model_revision: str
    prompt_sha256: str


@dataclass(frozen=True)
class CalibrationRow:
    """How well a run's stored probabilities predict the truth.

    ``pointwise``: the score (on [0, 1]) against "this tile is the positive", every scored tile.
    ``pairwise``: P(first) against "the first-shown tile is the better one", on comparisons with
    the positive in either place (the only pairs whose better tile is known).
    """

    run_id: int
    kind: str
    n: int
    ece: float
    bins: tuple[ReliabilityBin, ...]
    separation: float | None = None  # pointwise: mean within-query P(positive scores above another)


@dataclass(frozen=True)
class PositionBiasRow:
    """A pairwise run's position bias (``stats.position_bias``: first-shown win rate per rank gap
    against what stage-1 ranks alone predict, the positive's win rate shown first versus second)."""

    run_id: int
    bias: PositionBias


@dataclass(frozen=True)
class RetrievalRow:
    """A stage-1 retrieval run over the whole gallery (Sample4Geo's counting)."""

    retrieval_run_id: int
    name: str
    candidate_set_id: int | None
    candidates: str | None
    model: str
    random_init: bool
    status: str
    gallery: int
    one_percent_k: int
    n_queries: int
    recall: dict[str, float | None]  # "recall@1", "recall@3", "recall@5", "recall@10", "recall@1%"
    hit_rate: float | None
    skipped_images: int
    skipped_tiles: int
    skipped_queries: int


@dataclass(frozen=True)
class Report:
    confidence: float
    common: bool  # every row of a candidate set restricted to the queries all its runs finished
    query_sets: tuple[QuerySet, ...]
    baselines: tuple[BaselineRow, ...]
    runs: tuple[RunRow, ...]
    comparisons: tuple[ComparisonRow, ...]
    costs: tuple[CostRow, ...]
    calibration: tuple[CalibrationRow, ...]
    position_bias: tuple[PositionBiasRow, ...]
    retrieval: tuple[RetrievalRow, ...]
    notes: tuple[str, ...]  # what a reader must know: methods, query sets, left-out runs

    def baseline_for(self, run: RunRow) -> BaselineRow:
        return next(b for b in self.baselines if b.query_set == run.query_set and b.k == run.k)

    def run(self, run_id: int) -> RunRow:
        return next(r for r in self.runs if r.run_id == run_id)

    def table1_rows(self) -> Iterator[BaselineRow | RunRow]:
        """Table 1's order: per query set, its baselines (one per K), then its runs."""
        for qs in self.query_sets:
            yield from (b for b in self.baselines if b.query_set == qs.label)
            yield from (r for r in self.runs if r.query_set == qs.label)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _recall_at(recalls: tuple[Recall, ...], k: int) -> Recall:
    return next(r for r in recalls if r.k == k)
