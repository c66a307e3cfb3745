"""A real ``celery -A workers.app worker -Q vlm.<slug>`` holding a tiny LLaVA checkpoint (a local
folder built by the test, loaded with ``from_pretrained`` in the worker's child on its first
task) completes a pairwise and a pointwise run on PostgreSQL and Redis, with one corrupt tile
among the candidates: its judgments are recorded failed and the runs go on.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import PairwiseVerdict, PointwiseScore, Query, Ranking, Run, Tile
from tests.builders import synthetic_dataset
from tests.integration.conftest import cli
from tests.tiny_vlms import tiny_checkpoint
from workers.judges.checkpoint import folder_revision
from workers.queues import queue_for

pytestmark = pytest.mark.integration

K = 3


def rankings(engine, run_id: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    with engine.connect() as c:
        for qname, tname in c.execute(
            select(Query.name, Tile.name)
            .join(Ranking, Ranking.query_id == Query.id)
            .join(Tile, Tile.id == Ranking.tile_id)
            .where(Ranking.run_id == run_id)
            .order_by(Ranking.query_id, Ranking.rank)
        ):
            out[qname].append(tname)
    return dict(out)


def test_tiny_llava_worker_completes_pairwise_and_pointwise_runs(
    stack_env, pg_url, workers, tmp_path, tmp_path_factory
):
    folder = tiny_checkpoint("llava", tmp_path_factory.getbasetemp() / "tiny-vlms")
    data = synthetic_dataset(tmp_path / "VIGOR", n_queries=3, k=K, image_size=32)
    cli(stack_env, "ingest", str(data))
    cli(stack_env, "import-candidates", str(data / "candidates.csv"), "--name", "s4g")
    with (data / "candidates.csv").open(newline="") as fh:
        stage1: dict[str, list[str]] = defaultdict(list)
        for row in sorted(csv.DictReader(fh), key=lambda r: int(r["rank"])):
            stage1[row["query"]].append(row["tile"])
    # One candidate tile is corrupt on disk (after ingest): its judgments must fail alone.
    broken = stage1[sorted(stage1)[0]][1]
    (broken_path,) = data.glob(f"*/satellite/{broken}")
    broken_path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))

    stack_env.update(OMP_NUM_THREADS="1", CVGL_VLM_DEVICE="cpu", CVGL_VLM_BATCH_SIZE="4")
    queue = queue_for(str(folder))
    assert queue == "vlm.tiny-llava"
    workers([queue], "vlm-tiny-llava", app="workers.app")
    workers(["coordination"], "coordinator")
    common = ["--judge", "llava", "--model", str(folder), "--all-queries", "--k", str(K), "--wait"]
    pair = int(cli(stack_env, "submit", "--strategy", "pairwise", *common).stdout.split()[-1])
    point = int(
        cli(stack_env, "submit", "--strategy", "pointwise", "--prompt", "yesno", *common).stdout.split()[-1]
    )

    # A model the worker cannot load (no such hub id, offline): every judgment is a recorded
    # failure and the run still finishes, each query in its stage-1 order (failures keep the order).
    unloadable = ["--judge", "llava", "--model", "llava-hf/no-such-model", "--queue", queue]
    lost = int(
        cli(stack_env, "submit", "--strategy", "pairwise", *common[4:], *unloadable).stdout.split()[-1]
    )

    engine = create_engine(pg_url)
    revision = folder_revision(folder)
    with Session(engine) as c:
        assert {c.scalar(select(Run.status).where(Run.id == r)) for r in (pair, point)} == {"done"}
        verdicts = c.execute(
            select(PairwiseVerdict, Query.name, Tile.name)
            .join(Query, Query.id == PairwiseVerdict.query_id)
            .join(Tile, Tile.id == PairwiseVerdict.tile_first)
            .where(PairwiseVerdict.run_id == pair)
        ).all()
        second_names = dict(c.execute(select(Tile.id, Tile.name)).all())
        scores = c.execute(
            select(PointwiseScore, Tile.name)
            .join(Tile, Tile.id == PointwiseScore.tile_id)
            .where(PointwiseScore.run_id == point)
        ).all()
        lost_verdicts = c.scalars(select(PairwiseVerdict).where(PairwiseVerdict.run_id == lost)).all()
    ranked_pair, ranked_point = rankings(engine, pair), rankings(engine, point)
    assert rankings(engine, lost) == stage1
    engine.dispose()

    assert set(ranked_pair) == set(ranked_point) == set(stage1)
    for order in (*ranked_pair.values(), *ranked_point.values()):
        assert len(order) == K
    # Pairwise: every verdict done (with its probabilities) unless it shows the corrupt tile.
    assert verdicts and all(v.status in ("done", "failed") for v, _, _ in verdicts)
    for v, qname, first in verdicts:
        second = second_names[v.tile_second]
        order = ranked_pair[qname]
        if broken in (first, second):
            assert v.status == "failed" and broken in v.error and v.p_first is None
            assert order.index(first) < order.index(second)  # a failed comparison keeps the order shown
            continue
        assert v.status == "done", v.error
        assert v.p_first + v.p_second == pytest.approx(1.0)
        assert set(json.loads(v.raw_output)) == {"1", "2"}
        assert v.model_revision == revision and v.worker.startswith("vlm-tiny-llava@")
        assert v.latency_ms > 0 and v.attempts == 1
        winner, loser = (first, second) if v.first_wins else (second, first)
        assert order.index(winner) < order.index(loser)  # the ranking follows the stored verdicts
    assert any(v.status == "failed" for v, _, _ in verdicts)
    # Pointwise: one Yes/No score per candidate; the corrupt tile's is a recorded failure.
    assert len(scores) == len(stage1) * K
    for s, tname in scores:
        if tname == broken:
            assert s.status == "failed" and s.score is None and broken in s.error
        else:
            assert s.status == "done" and 0.0 < s.score < 1.0
            assert s.probs["Yes"] + s.probs["No"] == pytest.approx(1.0)
            assert s.model_revision == revision
    assert lost_verdicts and all(
        v.status == "failed" and "cannot load judge llava llava-hf/no-such-model" in v.error
        for v in lost_verdicts
    )
