"""Builders for test data: a synthetic VIGOR-layout dataset and its candidates (no mocks)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from orchestrator.synth import write_synthetic_vigor
from orchestrator.vigor import read_vigor


def synthetic_dataset(
    root: Path, n_queries: int = 40, k: int = 20, seed: int = 0, image_size: int = 32
) -> Path:
    write_synthetic_vigor(root, n_queries, k=k, seed=seed, image_size=image_size)
    return root


def positives_from_files(root: Path, split: str = "cross-area") -> dict[str, str]:
    """query name -> positive tile name, read straight from the label files."""
    return {lb.query: lb.tile for lb in read_vigor(root, split).labels if lb.relation == "positive"}


def candidates_from_csv(path: Path) -> dict[str, list[str]]:
    """query name -> tiles in stage-1 order, read straight from the CSV."""
    out: dict[str, dict[int, str]] = defaultdict(dict)
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out[row["query"]][int(row["rank"])] = row["tile"]
    return {q: [r[i] for i in sorted(r)] for q, r in out.items()}


def recall_at(orders: dict[str, list[str]], positives: dict[str, str], k: int) -> float:
    """Percent of queries whose positive is among the first k: an independent evaluator."""
    hits = sum(1 for q, order in orders.items() if positives[q] in order[:k])
    return 100.0 * hits / len(orders)
