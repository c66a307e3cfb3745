"""Top-K gallery tiles per query by chunked matrix products, plus where the positive ranks.

Sample4Geo concatenates the whole query x gallery similarity matrix on the CPU (about 10 GB for
VIGOR's cross-area test, its issue #3). Here each chunk of queries is multiplied by the gallery,
reduced to its top K and to the positive's rank, and dropped: memory is one chunk
(``max_chunk_bytes``) plus the two embedding matrices, on a GPU or a CPU.

Ranks are counted as Sample4Geo counts them: the number of gallery tiles whose similarity is
strictly greater than the positive's (ties favour the positive). ``hit_rank`` counts the same
with the query's semi-positive tiles left out; the hit rate is ``hit_rank < 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CHUNK_BYTES = 1 << 28  # 256 MiB of similarities (+ a boolean mask) per chunk


@dataclass(frozen=True)
class Ranked:
    indices: np.ndarray  # (n_queries, k) int64 gallery rows, best first
    scores: np.ndarray  # (n_queries, k) float32 cosine similarities
    positive_rank: np.ndarray  # (n_queries,) int64; -1 where the query has no positive row
    hit_rank: np.ndarray  # (n_queries,) int64; -1 likewise
    positive_score: np.ndarray  # (n_queries,) float32; NaN likewise


def chunk_rows(n_gallery: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Queries per chunk so that float32 similarities plus a bool mask stay under the budget."""
    return max(1, max_chunk_bytes // (max(1, n_gallery) * 5))


def rank_gallery(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    positives: np.ndarray | None = None,
    semi_positives: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Ranked:
    """Rank ``gallery`` rows for every ``queries`` row by dot product (cosine for unit vectors).

    Args:
        queries: (n_queries, dim) embeddings (any float dtype; computed in float32).
        gallery: (n_gallery, dim) embeddings.
        k: how many rows to return per query (at most n_gallery).
        positives: (n_queries,) gallery row of each query's positive, -1 for none.
        semi_positives: (n_queries, m) gallery rows of its semi-positives, -1 padded.
        device: where to multiply ("cuda" on a GPU worker).
        max_chunk_bytes: memory budget of one chunk of similarities.
    """
    n_q, n_g = len(queries), len(gallery)
    if n_g == 0:
        raise ValueError("the gallery is empty: no tile has an embedding")
    if not 1 <= k <= n_g:
        raise ValueError(f"k={k} must be between 1 and the gallery size {n_g}")
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {queries.shape}, gallery {gallery.shape}")
    pos = np.full(n_q, -1, dtype=np.int64) if positives is None else np.asarray(positives, dtype=np.int64)
    semi = (
        np.full((n_q, 0), -1, dtype=np.int64)
        if semi_positives is None
        else np.asarray(semi_positives, dtype=np.int64).reshape(n_q, -1)
    )
    device = torch.device(device)
    g = torch.from_numpy(np.ascontiguousarray(gallery)).to(device=device, dtype=torch.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    scores = np.empty((n_q, k), dtype=np.float32)
    positive_rank = np.full(n_q, -1, dtype=np.int64)
    hit_rank = np.full(n_q, -1, dtype=np.int64)
    positive_score = np.full(n_q, np.nan, dtype=np.float32)
    step = chunk_rows(n_g, max_chunk_bytes)
    with torch.inference_mode():
        for lo in range(0, n_q, step):
            hi = min(n_q, lo + step)
            q = torch.from_numpy(np.ascontiguousarray(queries[lo:hi])).to(device=device, dtype=torch.float32)
            sim = q @ g.T
            top = torch.topk(sim, k, dim=1, largest=True, sorted=True)
            indices[lo:hi] = top.indices.cpu().numpy()
            scores[lo:hi] = top.values.cpu().numpy()
            p = torch.from_numpy(pos[lo:hi]).to(device)
            has = p >= 0
            if not bool(has.any()):
                continue
            col = p.clamp(min=0).unsqueeze(1)
            gt = sim.gather(1, col)
            above = sim > gt  # strict, as Sample4Geo: a tie does not push the positive down
            ranks = above.sum(dim=1)
            if semi.shape[1]:
                s = torch.from_numpy(semi[lo:hi]).to(device)
                # Padding (-1) points at the positive's own column, which is never above itself.
                s = torch.where(s >= 0, s, col)
                above.scatter_(1, s, False)
            hits = above.sum(dim=1)
            sel = has.cpu().numpy()
            positive_rank[lo:hi][sel] = ranks.cpu().numpy()[sel]
            hit_rank[lo:hi][sel] = hits.cpu().numpy()[sel]
            positive_score[lo:hi][sel] = gt.squeeze(1).cpu().numpy()[sel]
    return Ranked(indices, scores, positive_rank, hit_rank, positive_score)
