"""`orchestrator retrieve` on the embedded SQLite default: options, sharding, resume rules (no model runs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import func, select

from db import retrieval as retrieval_db
from db.engine import database_url, session_factory
from db.migrate import alembic_config, upgrade_to_head
from db.models import EmbeddingShard, Query, RetrievalRun, SkippedImage, Tile
from orchestrator.cli import cli
from orchestrator.retrieve import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_K,
    DEFAULT_SHARD_SIZE,
    RetrieveError,
    RetrieveSpec,
    create_or_resume,
)
from tests.builders import synthetic_dataset
from workers.retrieval import store


@pytest.fixture(scope="module")
def vigor(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("vigor") / "VIGOR", n_queries=10, image_size=16)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def ingested(vigor) -> Path:
    assert run("ingest", str(vigor)).exit_code == 0
    return vigor


def _count(model) -> int:
    with session_factory()() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_help_names_the_sample4geo_options():
    out = run("retrieve", "--help").output
    for option in (
        "--checkpoint",
        "--random-init",
        "--model",
        "--k",
        "--name",
        "--batch-size",
        "--shard-size",
    ):
        assert option in out
    # The CLI's defaults are the library's (Sample4Geo's VIGOR evaluation settings).
    for default in (
        store.DEFAULT_MODEL,
        store.DEFAULT_IMG_SIZE,
        DEFAULT_BATCH_SIZE,
        DEFAULT_SHARD_SIZE,
        DEFAULT_K,
    ):
        assert re.search(rf"\[default: {default}[;\]]", " ".join(out.split())), default


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "no --checkpoint given"),
        (["--random-init", "--checkpoint", "w.pth"], "either --checkpoint or --random-init"),
        (["--checkpoint", "missing.pth"], "checkpoint missing.pth does not exist"),
        (["--random-init", "--k", "100000"], "exceeds the"),
        (["--random-init", "--name", " "], "--name must not be empty"),
    ],
)
def test_bad_options_are_one_line_errors_and_store_nothing(ingested, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"x")
    args = ["--name", "r", *args] if "--name" not in args else args
    result = run("retrieve", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert _count(RetrievalRun) == 0


def test_no_dataset_is_an_error():
    result = run("retrieve", "--random-init", "--name", "r")
    assert result.exit_code == 1 and "no dataset ingested" in result.output


def test_a_candidate_set_of_the_same_name_is_refused(ingested):
    assert run("import-candidates", str(ingested / "candidates.csv"), "--name", "s4g").exit_code == 0
    result = run("retrieve", "--random-init", "--name", "s4g")
    assert result.exit_code == 1 and "candidate set named 's4g' already exists" in result.output


def test_shards_cover_every_tile_and_query_once_in_gallery_order(ingested, tmp_path, monkeypatch):
    monkeypatch.setenv(store.EMBEDDINGS_DIR_ENV, str(tmp_path / "emb"))
    with session_factory().begin() as s:
        prepared = create_or_resume(
            s, RetrieveSpec(name="r", random_init=True, shard_size=7, model="convnext_atto")
        )
    assert prepared.created and prepared.status == "running"
    with session_factory()() as s:
        run_row = s.get(RetrievalRun, prepared.run_id)
        assert Path(run_row.embeddings_dir).parent == tmp_path / "emb"
        assert run_row.random_init and run_row.checkpoint is None
        tiles = list(s.scalars(select(Tile.id).order_by(Tile.id)))
        queries = list(s.scalars(select(Query.id).order_by(Query.id)))
        for kind, ids in (("tile", tiles), ("query", queries)):
            shards = s.scalars(
                select(EmbeddingShard).where(EmbeddingShard.kind == kind).order_by(EmbeddingShard.shard_index)
            ).all()
            assert [i for sh in shards for i in sh.item_ids] == ids
            assert [sh.n_items for sh in shards[:-1]] == [7] * (len(shards) - 1)
            assert all(sh.status == "pending" and sh.attempts == 0 for sh in shards)
    assert prepared.shards == -(-len(tiles) // 7) + -(-len(queries) // 7)


def test_rerunning_with_other_settings_is_refused_and_changes_nothing(ingested):
    with session_factory().begin() as s:
        create_or_resume(s, RetrieveSpec(name="r", random_init=True, k=20))
    result = run("retrieve", "--random-init", "--name", "r", "--k", "10", "--no-wait")
    assert result.exit_code == 1
    assert "exists with other settings (k: stored 20, now 10" in result.output
    with session_factory()() as s:
        assert s.scalar(select(RetrievalRun.k)) == 20
    with session_factory().begin() as s:  # the same settings resume the same run
        again = create_or_resume(s, RetrieveSpec(name="r", random_init=True, k=20, batch_size=8))
    assert not again.created and _count(RetrievalRun) == 1


def test_rerunning_a_failed_run_retries_what_is_not_stored(ingested):
    with session_factory().begin() as s:
        run_id = create_or_resume(s, RetrieveSpec(name="r", random_init=True, shard_size=5)).run_id
    with session_factory().begin() as s:
        first, second, third = s.scalars(select(EmbeddingShard.id).order_by(EmbeddingShard.id).limit(3)).all()
        s.execute(EmbeddingShard.__table__.update().where(EmbeddingShard.id == third).values(attempts=2))
        done = retrieval_db.shard_work(s, first)
        s.execute(
            EmbeddingShard.__table__.update()
            .where(EmbeddingShard.id == first)
            .values(status="done", attempts=1, n_embedded=5)
        )
        retrieval_db.skip_images(s, done, {0: "corrupt"})
        retrieval_db.give_up_shard(s, retrieval_db.shard_work(s, second), "gave up after 3 attempts")
        retrieval_db.fail_run(s, run_id, "checkpoint ... does not fit")
    assert _count(SkippedImage) == 1 + 5
    with session_factory().begin() as s:
        again = create_or_resume(s, RetrieveSpec(name="r", random_init=True, shard_size=5))
    assert again.status == "running" and again.reset_shards == 1
    with session_factory()() as s:
        statuses = dict(s.execute(select(EmbeddingShard.id, EmbeddingShard.status)).all())
        assert statuses[first] == "done" and statuses[second] == "pending"
        assert s.scalar(select(RetrievalRun.error)) is None
        attempts = dict(s.execute(select(EmbeddingShard.id, EmbeddingShard.attempts)).all())
        # The run's failure was no shard's fault: every shard not done starts from zero attempts.
        assert attempts[first] == 1 and attempts[second] == 0 and attempts[third] == 0
    assert _count(SkippedImage) == 1  # the done shard's corrupt image stays recorded


def test_shard_files_are_written_whole_and_checked_on_read(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = store.write_shard_file(tmp_path / "run", "tile-00000.npy", arr)
    assert path.stat().st_mode & 0o777 == 0o644
    back = store.read_shard_file(path, 3)
    assert back.dtype == np.float16 and np.array_equal(back, arr.astype(np.float16))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tile-00000.npy"]
    with pytest.raises(ValueError, match=r"expected float16 \(4, dim\)"):
        store.read_shard_file(path, 4)
    with pytest.raises(FileNotFoundError, match="CVGL_EMBEDDINGS_DIR"):
        store.read_shard_file(tmp_path / "run" / "nope.npy", 3)


def test_migration_0003_downgrades_and_upgrades():
    upgrade_to_head()
    cfg = alembic_config()
    cfg.attributes["url"] = database_url()
    command.downgrade(cfg, "0002")
    command.upgrade(cfg, "0003")
    with session_factory()() as s:
        assert s.scalar(select(func.count()).select_from(RetrievalRun)) == 0


def test_a_spec_without_weights_is_refused_before_touching_the_database():
    with pytest.raises(RetrieveError, match="no --checkpoint given"):
        create_or_resume(None, RetrieveSpec(name="r"))  # type: ignore[arg-type]


def test_a_shard_another_live_worker_embeds_is_deferred_not_counted(ingested, monkeypatch):
    """Retrieval shards follow the judgments' lease rule (db/leases.py): a duplicate delivery of a
    shard being embedded costs no attempt and is asked again when that lease would run out."""
    from datetime import UTC, datetime, timedelta

    from workers.retrieval import tasks as retrieval_tasks

    with session_factory().begin() as s:
        create_or_resume(s, RetrieveSpec(name="r", random_init=True, shard_size=5))
    with session_factory().begin() as s:
        shard = s.scalar(select(EmbeddingShard.id).order_by(EmbeddingShard.id).limit(1))
        s.execute(
            EmbeddingShard.__table__.update()
            .where(EmbeddingShard.id == shard)
            .values(
                attempts=1,
                leased_by="gpu-box-9:77:cafe",
                lease_until=datetime.now(UTC) + timedelta(seconds=20),
            )
        )
    sent = []
    monkeypatch.setattr(
        retrieval_tasks.app,
        "send_task",
        lambda name, args, queue, countdown: sent.append((name, args, countdown)),
    )
    out = retrieval_tasks.embed_shard(shard)
    assert "deferred" in out and "being embedded elsewhere" in out["deferred"]
    assert sent and sent[0][:2] == ("cvgl.embed_shard", [shard]) and 19 < sent[0][2] < 23
    with session_factory()() as s:
        row = s.execute(
            select(EmbeddingShard.attempts, EmbeddingShard.status).where(EmbeddingShard.id == shard)
        ).one()
    assert tuple(row) == (1, "pending")
