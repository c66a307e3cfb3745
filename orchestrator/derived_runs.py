"""``orchestrator calibrate``: a derived run from a finished run's stored judgments (see
``orchestrator/calibrate.py`` for the methods). Asks no worker anything; adds rows, changes none."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.orm import Session

from db import derived as store
from db.models import Run
from orchestrator.calibrate import CalibrateError, QueryEvidence, check_method, derive
from orchestrator.reporting.stats import score_as_probability

PARAMETER_NAMES = {"fuse": "weight", "gate": "threshold"}


def calibrate_run(s: Session, parent_id: int, method: str, dev_share: float = 0.3, seed: int = 0) -> int:
    """Fit ``method`` on a seeded ``dev_share`` of the parent's finished queries and store the
    derived run on the rest; returns its id. Raises CalibrateError for what a user must fix."""
    check_method(method)
    parent = s.get(Run, parent_id)
    if parent is None:
        raise CalibrateError(f"no run with id {parent_id}")
    if store.is_derived(s, parent_id):
        raise CalibrateError(
            f"run {parent_id} is itself derived (from run {store.parent_of(s, parent_id)}); calibrate that run"
        )
    if parent.status != "done":
        raise CalibrateError(
            f"run {parent_id} is not finished (status {parent.status}); wait for it (orchestrator status "
            f"{parent_id}) or resume it, then calibrate"
        )
    queries = evidence(s, parent)
    result = derive(method, list(queries.values()), dev_share, seed)
    ids = {q.name: query_id for query_id, q in queries.items()}
    params = {
        "judge_options": dict((parent.params or {}).get("judge_options", {})),
        "decode": (parent.params or {}).get("decode", "choices"),
        # A fine-tuned parent's adapter (and its overlap count) labels the derived run in reports too.
        **({"adapter": parent.params["adapter"]} if (parent.params or {}).get("adapter") else {}),
        "strategy_options": {
            "parent": parent.id,
            "parent_strategy": parent.strategy,
            **{f"parent_{k}": v for k, v in ((parent.params or {}).get("strategy_options") or {}).items()},
            PARAMETER_NAMES[method]: result.parameter if result.parameter != float("inf") else "never",
            "dev_share": dev_share,
            "seed": seed,
            "dev_queries": len(result.dev),
        },
    }
    return store.store_derived_run(
        s,
        parent,
        method,
        seed,
        params,
        {ids[name]: order for name, order in result.orders.items()},
        [ids[name] for name in result.dev],
    )


def evidence(s: Session, parent: Run) -> dict[int, QueryEvidence]:
    """query id -> what the parent stored for it, as ``QueryEvidence`` (failed judgments left out)."""
    names = store.finished_queries(s, parent.id)
    stage1 = store.stage1_orders(s, parent.id)
    positive = store.positives(s, parent.id)
    scores: dict[int, dict[int, float]] = defaultdict(dict)
    for r in store.pointwise_scores(s, parent.id):
        scores[r.query_id][r.tile_id] = score_as_probability(float(r.score), parent.prompt_name)
    comparisons: dict[int, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in store.pairwise_verdicts(s, parent.id):
        if r.p_first is not None and r.p_second is not None and r.p_first + r.p_second > 0:
            p = r.p_first / (r.p_first + r.p_second)
        else:  # a generated answer: the verdict alone
            p = 1.0 if r.first_wins else 0.0
        comparisons[r.query_id][(r.tile_first, r.tile_second)] = p
    pairwise = parent.strategy != "pointwise"
    orders = store.run_orders(s, parent.id) if pairwise else {}
    return {
        q: QueryEvidence(
            name=name,
            tiles=tuple(stage1.get(q, ())),
            positive=positive.get(q),
            scores=scores.get(q, {}),
            judge_order=tuple(orders.get(q, ())),
            comparisons=comparisons.get(q, {}),
        )
        for q, name in names.items()
    }
