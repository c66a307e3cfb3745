"""Judgment reuse and both-order debiasing through real Celery workers, Redis and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import aliased

from db.models import PairwiseVerdict, Query, Ranking, Run, Tile
from tests.builders import candidates_from_csv, positives_from_files
from tests.integration.conftest import cli

pytestmark = pytest.mark.integration

# A judge that is right about every pair but moves 0.3 of the mass to the tile shown first.
JUDGE = ["--accuracy", "1.0", "--position-bias", "0.3", "--queries", "12", "--seed", "5"]


def _submit(env, *args: str) -> int:
    return int(cli(env, "submit", *args, *JUDGE, "--wait", timeout=240).stdout.split()[-1])


def _verdicts(engine, run_id: int) -> dict[tuple[int, int, int], PairwiseVerdict]:
    with engine.connect() as c:
        rows = c.execute(select(PairwiseVerdict).where(PairwiseVerdict.run_id == run_id)).all()
    return {(r.query_id, r.tile_first, r.tile_second): r for r in rows}


def _rankings(engine, run_id: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with engine.connect() as c:
        for q, t in c.execute(
            select(Query.name, Tile.name)
            .select_from(Ranking)
            .join(Query, Query.id == Ranking.query_id)
            .join(Tile, Tile.id == Ranking.tile_id)
            .where(Ranking.run_id == run_id)
            .order_by(Ranking.query_id, Ranking.rank)
        ):
            out.setdefault(q, []).append(t)
    return out


def _status(env) -> dict[int, tuple[int, int]]:
    """run -> (judged, reused) from `orchestrator status`."""
    header, *rows = (line.split() for line in cli(env, "status").stdout.splitlines())
    at = header.index("judged"), header.index("reused")
    return {int(r[0]): (int(r[at[0]]), int(r[at[1]])) for r in rows}


def test_reuse_and_both_orders(stack_env, dataset, pg_url, workers):
    cli(stack_env, "ingest", str(dataset))
    cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
    workers(["vlm.simulated"], "vlm-simulated", app="workers.app")
    workers(["coordination"], "coordinator")
    engine = create_engine(pg_url)
    positives = positives_from_files(dataset)
    stage1 = candidates_from_csv(dataset / "candidates.csv")

    first = _submit(stack_env, "--strategy", "tournament", "--top", "5")
    computed = _verdicts(engine, first)
    assert computed and all(v.reused_from_id is None and v.status == "done" for v in computed.values())
    assert max(sum(1 for k in computed if k[0] == q) for q in {k[0] for k in computed}) <= 35

    # The same run again: every verdict is copied from the first, no worker is asked.
    again = _submit(stack_env, "--strategy", "tournament", "--top", "5")
    copied = _verdicts(engine, again)
    assert copied.keys() == computed.keys()
    for key, v in copied.items():
        src = computed[key]
        assert (v.reused_from_id, v.status, v.first_wins, v.p_first) == (
            src.id,
            "done",
            src.first_wins,
            src.p_first,
        )
        assert v.attempts == 0 and v.latency_ms is None and v.model_revision == src.model_revision
    assert _rankings(engine, again) == _rankings(engine, first)

    # --no-reuse asks the workers again, and the deterministic judge answers the same.
    fresh = _submit(stack_env, "--strategy", "tournament", "--top", "5", "--no-reuse")
    assert all(v.reused_from_id is None for v in _verdicts(engine, fresh).values())
    assert _rankings(engine, fresh) == _rankings(engine, first)

    # Both orders: each comparison in both orders; the orders already stored are reused (from the
    # original, never from a copy); the position bias cancels, so the top 5 is exactly the judge's
    # true order: the positive first when retrieved, then stage-1 order.
    both = _submit(stack_env, "--strategy", "tournament", "--top", "5", "--both-orders")
    pairs = _verdicts(engine, both)
    assert all((q, b, a) in pairs for q, a, b in pairs)
    reused = [v for v in pairs.values() if v.reused_from_id is not None]
    assert reused and len(reused) < len(pairs)
    source = aliased(PairwiseVerdict)
    with engine.connect() as c:
        origins = c.execute(
            select(source.run_id, source.reused_from_id).where(
                source.id.in_([v.reused_from_id for v in reused])
            )
        ).all()
    assert {run for run, _ in origins} <= {first, fresh} and all(r is None for _, r in origins)
    assert _status(stack_env) == {
        first: (len(computed), 0),
        again: (len(copied), len(copied)),
        fresh: (len(computed), 0),
        both: (len(pairs), len(reused)),
    }

    debiased, biased = _rankings(engine, both), _rankings(engine, first)
    hits = {"biased": 0, "debiased": 0}
    for q, order in debiased.items():
        pos = positives[q]
        truth = ([pos] if pos in stage1[q][:20] else []) + [t for t in stage1[q][:20] if t != pos]
        assert order[:5] == truth[:5]
        hits["debiased"] += order[0] == pos
        hits["biased"] += biased[q][0] == pos
    assert hits["debiased"] >= hits["biased"]
    with engine.connect() as c:
        params = c.scalar(select(Run.params).where(Run.id == both))
    assert params["strategy_options"] == {"top": 5, "both_orders": True} and params["reuse"] is True
    engine.dispose()
