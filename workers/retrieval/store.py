"""Where retrieval state lives: shard rows in SQL (``db/retrieval.py``), embeddings in float16 .npy
files they name.

A shard's file is written (atomically, fsynced) before the UPDATE that marks it done
(``db.retrieval.complete_shard``), so a shard marked 'done' always has its file. Files go under
``CVGL_EMBEDDINGS_DIR`` (default ``CVGL_HOME/embeddings``), one folder per run; with PostgreSQL
and several hosts that folder must be shared storage mounted at the same path everywhere.

Torch-free (numpy only), so the orchestrator may import it; imports only ``db`` of ours. The
top-K job's input is read here: shard rows from SQL, embeddings from their files.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from db.engine import cvgl_home
from db.models import RetrievalRun
from db.retrieval import QUERY, TILE, RankingInput, done_shards, ground_truth
from db.settings import settings

# Sample4Geo's VIGOR evaluation settings (eval_vigor_cross.py), here so the CLI can name them
# without importing torch.
DEFAULT_MODEL = "convnext_base.fb_in22k_ft_in1k_384"
DEFAULT_IMG_SIZE = 384  # tiles 384x384, panoramas 384x768
EMBEDDINGS_DIR_ENV = "CVGL_EMBEDDINGS_DIR"
VIEW_OF_KIND = {TILE: "satellite", QUERY: "ground"}


def embeddings_root() -> Path:
    """``CVGL_EMBEDDINGS_DIR``, else ``CVGL_HOME/embeddings``."""
    configured = settings().embeddings_dir
    return configured.expanduser() if configured else cvgl_home() / "embeddings"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_folder_name(run_id: int, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "run"
    return f"{run_id:05d}-{slug}"


def write_shard_file(folder: str | Path, name: str, embeddings: np.ndarray) -> Path:
    """Write a float16 .npy atomically (temp file, fsync, rename): a crash leaves no half file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(embeddings, dtype=np.float16), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other hosts' workers read it
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_shard_file(path: str | Path, n_rows: int) -> np.ndarray:
    """Load a shard's embeddings, checking that the file matches its database row."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"embedding file {path} is missing; is {EMBEDDINGS_DIR_ENV} shared by every retrieval worker?"
        ) from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"embedding file {path} is unreadable: {exc}") from exc
    if arr.dtype != np.float16 or arr.ndim != 2 or arr.shape[0] != n_rows:
        raise ValueError(
            f"embedding file {path} holds {arr.dtype} {arr.shape}, expected float16 ({n_rows}, dim)"
        )
    return arr


# ----------------------------------------------------------------------------------------------
# the top-K job's input


def _load_kind(s: Session, run: RetrievalRun, kind: str) -> tuple[np.ndarray, np.ndarray]:
    shards = done_shards(s, run.id, kind)
    ids: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for shard in shards:
        arr = read_shard_file(Path(run.embeddings_dir) / shard.file, shard.n_items)
        keep = ~np.isnan(arr).any(axis=1)  # NaN rows: images recorded in skipped_images
        ids.append(np.asarray(shard.item_ids, dtype=np.int64)[keep])
        embs.append(arr[keep])
    dim = run.embed_dim or 0
    if not embs:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float16)
    return np.concatenate(ids), np.concatenate(embs)


def ranking_input(s: Session, run_id: int) -> RankingInput:
    run = s.get(RetrievalRun, run_id)
    if run is None:
        raise LookupError(f"retrieval run {run_id} does not exist")
    tile_ids, tiles = _load_kind(s, run, TILE)
    query_ids, queries = _load_kind(s, run, QUERY)
    row_of = {int(t): i for i, t in enumerate(tile_ids)}
    pos: dict[int, int] = {}
    semi: dict[int, list[int]] = defaultdict(list)
    for q, t, rel in ground_truth(s, query_ids.tolist()):
        if rel == "positive":
            pos[q] = row_of.get(t, -1)
        elif t in row_of:
            semi[q].append(row_of[t])
    width = max((len(v) for v in semi.values()), default=0)
    semi_arr = np.full((len(query_ids), width), -1, dtype=np.int64)
    for i, q in enumerate(query_ids.tolist()):
        rows = semi.get(q, [])
        semi_arr[i, : len(rows)] = rows
    return RankingInput(
        run_id=run.id,
        name=run.name,
        dataset_id=run.dataset_id,
        k=run.k,
        model=run.model,
        checkpoint=run.checkpoint,
        random_init=run.random_init,
        tile_ids=tile_ids,
        tiles=tiles,
        query_ids=query_ids,
        queries=queries,
        positives=np.array([pos.get(int(q), -1) for q in query_ids], dtype=np.int64),
        semi_positives=semi_arr,
    )


