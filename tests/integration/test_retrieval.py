"""Stage 1 through real retrieval workers on Redis and PostgreSQL (and on the embedded default).

A tiny timm ConvNeXt (convnext_atto, 64 px tiles) embeds a synthetic VIGOR dataset; the stored
candidates and the SQL metrics are checked against numpy on the very embedding files the workers
wrote, a Sample4Geo-format checkpoint with a wrong key fails the run with the key's name, and a
worker killed mid-job resumes without recomputing the shards it had stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, select, text

from db.models import Candidate, CandidateSet, EmbeddingShard, GroundTruth, Query, RetrievalRun, SkippedImage
from tests.builders import synthetic_dataset
from tests.integration.conftest import REPO, cli
from workers.retrieval.encoder import build_model

pytestmark = pytest.mark.integration

TINY = ["--model", "convnext_atto", "--img-size", "64", "--batch-size", "16"]


def _retrieval_worker(stack_env, workers, name: str, queues=("retrieval",), app: str = "workers.app"):
    # One decode process per shard: the DataLoader path of the GPU machines, inside a prefork child.
    stack_env["CVGL_RETRIEVAL_LOADER_WORKERS"] = "1"
    # Two shared cores: a second intra-op thread only spins against the other processes.
    stack_env["OMP_NUM_THREADS"] = "1"
    return workers(list(queues), name, app=app)


def _checkpoint(path: Path, seed: int = 3, rename: tuple[str, str] | None = None) -> Path:
    """A file in Sample4Geo's format: torch.save(TimmModel.state_dict())."""
    state = dict(build_model("convnext_atto", seed=seed).state_dict())
    if rename:
        state[rename[1]] = state.pop(rename[0])
    torch.save(state, path)
    return path


def _numpy_metrics(engine, run_id: int) -> tuple[dict[str, float], dict[int, list[int]], float]:
    """Sample4Geo's calculate_scores in numpy, on the shard files the workers wrote."""
    with engine.connect() as c:
        run = c.execute(select(RetrievalRun).where(RetrievalRun.id == run_id)).one()
        shards = c.execute(
            select(EmbeddingShard.kind, EmbeddingShard.item_ids, EmbeddingShard.file)
            .where(EmbeddingShard.retrieval_run_id == run_id)
            .order_by(EmbeddingShard.kind, EmbeddingShard.shard_index)
        ).all()
        labels = c.execute(select(GroundTruth.query_id, GroundTruth.tile_id, GroundTruth.relation)).all()
    emb: dict[str, dict[int, np.ndarray]] = {"tile": {}, "query": {}}
    for kind, ids, file in shards:
        arr = np.load(Path(run.embeddings_dir) / file)
        assert arr.dtype == np.float16 and arr.shape[0] == len(ids)
        for i, row in zip(ids, arr, strict=True):
            if not np.isnan(row).any():
                emb[kind][i] = row.astype(np.float64)
    tile_ids = sorted(emb["tile"])
    col = {t: j for j, t in enumerate(tile_ids)}
    gallery = np.stack([emb["tile"][t] for t in tile_ids])
    positive = {q: t for q, t, rel in labels if rel == "positive"}
    semi: dict[int, list[int]] = {}
    for q, t, rel in labels:
        if rel == "semi_positive" and t in col:
            semi.setdefault(q, []).append(col[t])
    ranks, hits, top, min_gap = [], [], {}, np.inf
    for q in sorted(emb["query"]):
        sim = gallery @ emb["query"][q]
        top[q] = [tile_ids[j] for j in np.argsort(-sim, kind="stable")[: run.k]]
        if positive[q] not in col:
            ranks.append(None)
            hits.append(None)
            continue
        gt = sim[col[positive[q]]]
        others = np.delete(sim, col[positive[q]])
        min_gap = min(min_gap, float(np.abs(others - gt).min()))
        ranks.append(int((sim > gt).sum()))
        masked = sim.copy()
        masked[semi.get(q, [])] = -np.inf
        hits.append(int((masked > gt).sum()))
    one_percent = len(tile_ids) // 100

    def share(values, k):
        return 100.0 * np.mean([v is not None and v < k for v in values])

    metrics = {f"recall@{k}": share(ranks, k) for k in (1, 5, 10)}
    metrics.update({"recall@1%": share(ranks, one_percent), "hit_rate": share(hits, 1)})
    return metrics, top, min_gap


def test_retrieve_through_workers_matches_numpy_and_feeds_submit(stack_env, pg_url, workers, tmp_path):
    data = synthetic_dataset(tmp_path / "VIGOR", n_queries=24, image_size=32)
    corrupt = sorted((data / "Chicago" / "satellite").glob("*.png"))[5]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = sorted((data / "SanFrancisco" / "panorama").glob("*.jpg"))[0]
    missing.unlink()
    cli(stack_env, "ingest", str(data))
    ckpt = _checkpoint(tmp_path / "weights_e40_0.6109.pth")
    _retrieval_worker(
        stack_env, workers, "retrieval", ("retrieval", "vlm.simulated", "coordination"), "orchestrator.tasks"
    )

    out = cli(
        stack_env, "retrieve", "--checkpoint", str(ckpt), "--name", "s4g-ret", "--shard-size", "40", *TINY
    )
    assert "2 skipped" in out.stdout and "submit --candidates s4g-ret" in out.stdout
    assert "retrieve s4g-ret" in out.stderr  # the progress bar of shards

    engine = create_engine(pg_url)
    with engine.connect() as c:
        run = c.execute(select(RetrievalRun)).one()
        cs = c.execute(select(CandidateSet).where(CandidateSet.name == "s4g-ret")).one()
        skipped = {p: e for p, e in c.execute(select(SkippedImage.path, SkippedImage.error))}
        stored: dict[int, list[int]] = {}
        for q, t in c.execute(
            select(Candidate.query_id, Candidate.tile_id)
            .where(Candidate.candidate_set_id == cs.id)
            .order_by(Candidate.query_id, Candidate.rank)
        ):
            stored.setdefault(q, []).append(t)
    assert run.status == "done" and not run.random_init and run.embed_dim == 320
    assert run.checkpoint == str(ckpt.resolve()) and run.n_gallery == run.n_tiles - 1
    assert cs.source == "retrieval" and cs.k == 20 and cs.details["retrieval_run_id"] == run.id
    rel = lambda p: str(p.relative_to(data))  # noqa: E731
    assert set(skipped) == {rel(corrupt), rel(missing)}
    assert str(corrupt) in skipped[rel(corrupt)] and "not a decodable image" in skipped[rel(corrupt)]
    assert "file not found" in skipped[rel(missing)]
    assert len(stored) == 23 and all(len(v) == 20 for v in stored.values())

    expected, top, min_gap = _numpy_metrics(engine, run.id)
    assert min_gap > 1e-6, "near-tied similarities: numpy and torch could order them differently"
    assert stored == top
    with engine.connect() as c:  # the candidate set's own stage-1 baseline over all its queries
        baseline = c.execute(text("SELECT * FROM candidate_set_recall")).one()._mapping

    # The candidate set is an ordinary stage-1 input: rerank it, then report both.
    run_id = int(
        cli(stack_env, "submit", "--candidates", "s4g-ret", "--queries", "5", "--wait").stdout.split()[-1]
    )
    report = json.loads(cli(stack_env, "report", "--format", "json").stdout)
    assert [r["run_id"] for r in report["runs"]] == [run_id]
    (row,) = report["retrieval"]
    assert row["candidates"] == "s4g-ret" and row["n_queries"] == 23 and row["gallery"] == run.n_tiles - 1
    assert row["skipped_images"] == 2 and row["skipped_tiles"] == 1 and row["skipped_queries"] == 1
    assert row["random_init"] is False and row["name"] == "s4g-ret"
    for key, value in expected.items():
        assert (row["hit_rate"] if key == "hit_rate" else row["recall"][key]) == pytest.approx(value), key
    # Whole-gallery R@k equals the candidate set's baseline R@k: the same ranks, cut at K.
    for k in (1, 5, 10):
        assert baseline[f"recall_at_{k}"] == pytest.approx(row["recall"][f"recall@{k}"])
    table = cli(stack_env, "report").stdout
    assert "Stage-1 retrieval over the whole gallery" in table and "R@1%" in table and "hit rate" in table
    engine.dispose()


def test_a_checkpoint_with_a_wrong_key_fails_loudly_then_a_fixed_file_finishes(
    stack_env, dataset, pg_url, workers, tmp_path
):
    cli(stack_env, "ingest", str(dataset))
    ckpt = _checkpoint(tmp_path / "weights.pth", rename=("model.head.norm.weight", "model.norm.weight"))
    _retrieval_worker(stack_env, workers, "retrieval")
    args = ["retrieve", "--checkpoint", str(ckpt), "--name", "s4g", *TINY]
    failed = cli(stack_env, *args, check=False)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: retrieval run 's4g' failed: checkpoint") and str(ckpt) in last
    assert "missing keys (model.head.norm.weight)" in last and "unexpected keys (model.norm.weight)" in last
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.scalar(select(RetrievalRun.status)) == "failed"
        assert c.scalar(select(CandidateSet.id)) is None
        assert set(c.scalars(select(EmbeddingShard.status))) == {"pending"}

    _checkpoint(ckpt)  # the user fixes the file and runs the same command again
    again = cli(stack_env, *args)
    assert "resuming retrieval run 's4g'" in again.stderr and "R@1 " in again.stdout
    with engine.connect() as c:
        assert (
            c.scalar(select(RetrievalRun.status)) == "done" and c.scalar(select(RetrievalRun.error)) is None
        )
        assert c.scalar(select(CandidateSet.source)) == "retrieval"
    engine.dispose()


def test_a_killed_retrieval_job_resumes_without_recomputing_stored_shards(
    stack_env, dataset, pg_url, workers
):
    cli(stack_env, "ingest", str(dataset))
    worker = _retrieval_worker(stack_env, workers, "retrieval-1")
    args = ["retrieve", "--random-init", "--seed", "5", "--shard-size", "24", *TINY]
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args, "--name", "killed"],
        env=stack_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = create_engine(pg_url)

    def done_shards() -> list[tuple[int, str, object, int]]:
        with engine.connect() as c:
            return c.execute(
                select(
                    EmbeddingShard.id,
                    EmbeddingShard.file,
                    EmbeddingShard.finished_at,
                    EmbeddingShard.attempts,
                )
                .where(EmbeddingShard.status == "done")
                .order_by(EmbeddingShard.id)
            ).all()

    deadline = time.monotonic() + 120
    while len(done_shards()) < 2:
        assert time.monotonic() < deadline, "no shard stored within 120 s"
        time.sleep(0.02)
    worker.kill()  # SIGKILL, parent and pool child, in the middle of the job
    orchestrator.kill()  # and the orchestrator the user was watching
    orchestrator.wait(timeout=10)
    before = done_shards()
    with engine.connect() as c:
        total = len(c.scalars(select(EmbeddingShard.id)).all())
        folder = Path(c.scalar(select(RetrievalRun.embeddings_dir)))
    assert len(before) < total, "the job finished before the kill; nothing to resume"
    mtimes = {file: (folder / file).stat().st_mtime_ns for _, file, _, _ in before}

    _retrieval_worker(stack_env, workers, "retrieval-2")
    resumed = cli(stack_env, *args, "--name", "killed")
    assert "resuming retrieval run 'killed'" in resumed.stderr
    after = {row[0]: row for row in done_shards()}
    assert len(after) == total
    for shard_id, file, finished_at, attempts in before:
        assert attempts == 1 and after[shard_id][3] == 1, f"shard {file} was embedded again"
        assert after[shard_id][2] == finished_at
        assert (folder / file).stat().st_mtime_ns == mtimes[file]

    # The same run uninterrupted gives the same candidates.
    cli(stack_env, *args, "--name", "uninterrupted")
    with engine.connect() as c:
        lists: dict[str, dict[int, list[int]]] = {}
        for name, q, t in c.execute(
            select(CandidateSet.name, Candidate.query_id, Candidate.tile_id)
            .join(CandidateSet, CandidateSet.id == Candidate.candidate_set_id)
            .order_by(CandidateSet.name, Candidate.query_id, Candidate.rank)
        ):
            lists.setdefault(name, {}).setdefault(q, []).append(t)
        assert c.scalar(select(Query.id).limit(1)) is not None
    assert len(lists["killed"]) == 40 and lists["killed"] == lists["uninterrupted"]
    engine.dispose()


def test_embedded_default_runs_retrieval_in_process(dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVGL_")}
    env.update(CVGL_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.update(CVGL_RETRIEVAL_LOADER_WORKERS="0", OMP_NUM_THREADS="1")
    cli(env, "ingest", str(dataset))
    out = cli(env, "retrieve", "--random-init", "--name", "local", *TINY)
    assert "202 images embedded, 0 skipped" in out.stdout and "untrained weights" in out.stdout
    assert "--random-init" in out.stderr
    assert sorted(p.name for p in (tmp_path / "home" / "embeddings").glob("*/*.npy")) == [
        "query-00000.npy",
        "tile-00000.npy",
    ]
    cli(env, "submit", "--candidates", "local", "--queries", "3", "--strategy", "pointwise")
    report = json.loads(cli(env, "report", "--format", "json").stdout)
    (row,) = report["retrieval"]
    assert row["random_init"] is True and row["n_queries"] == 40 and row["gallery"] == 162
