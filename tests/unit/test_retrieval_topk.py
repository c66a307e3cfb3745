"""Chunked top-K and Sample4Geo's rank counting, against a brute-force numpy evaluator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.retrieval.topk import chunk_rows, rank_gallery


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(q, g, k, pos, semi):
    """Sample4Geo's calculate_scores, one query at a time, over the full similarity matrix."""
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    ranks, hits = [], []
    for i, p in enumerate(pos):
        gt = sim[i, p]
        ranks.append(int((sim[i] > gt).sum()))
        masked = sim[i].copy()
        masked[[s for s in semi[i] if s >= 0]] = -np.inf
        hits.append(int((masked > gt).sum()))
    return top, np.array(ranks), np.array(hits)


@settings(max_examples=30, deadline=None)
@given(
    n_q=st.integers(1, 30),
    n_g=st.integers(1, 60),
    k=st.integers(1, 60),
    budget=st.sampled_from([1, 200, 1 << 20]),
    seed=st.integers(0, 10_000),
)
def test_matches_brute_force_for_any_chunking(n_q, n_g, k, budget, seed):
    k = min(k, n_g)
    rng = np.random.default_rng(seed)
    # Small integers: every dot product is exact in float32, and ties are frequent.
    q = rng.integers(-3, 4, (n_q, 6)).astype(np.float32)
    g = rng.integers(-3, 4, (n_g, 6)).astype(np.float32)
    pos = rng.integers(0, n_g, n_q)
    semi = rng.integers(-1, n_g, (n_q, 3))
    out = rank_gallery(q, g, k, pos, semi, max_chunk_bytes=budget)
    top, ranks, hits = _reference(q, g, k, pos, semi)
    sim = q @ g.T
    np.testing.assert_array_equal(out.scores, np.take_along_axis(sim, top, axis=1))
    np.testing.assert_array_equal(np.take_along_axis(sim, out.indices, axis=1), out.scores)
    assert all(len(set(row)) == k for row in out.indices.tolist())
    np.testing.assert_array_equal(out.positive_rank, ranks)
    np.testing.assert_array_equal(out.hit_rank, hits)
    np.testing.assert_array_equal(out.positive_score, sim[np.arange(n_q), pos])


def test_distinct_scores_give_the_same_order_as_a_full_sort():
    rng = np.random.default_rng(1)
    q, g = _unit(rng, 20, 8), _unit(rng, 50, 8)
    out = rank_gallery(q, g, 7, max_chunk_bytes=500)
    top, _, _ = _reference(q, g, 7, np.zeros(20, int), np.full((20, 1), -1))
    np.testing.assert_array_equal(out.indices, top)


def test_ties_favour_the_positive_and_semi_positives_count_for_the_hit_rate_only():
    g = np.array([[1, 0], [1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    q = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    # query 0: positive 1 ties with tile 0 -> rank 0 (strict >); query 1: positive 2, tiles 0 and 1
    # score higher, tile 1 is a semi-positive -> rank 2, hit rank 1; query 2: no positive.
    out = rank_gallery(q, g, 2, positives=[1, 2, -1], semi_positives=[[-1, -1], [1, -1], [0, -1]])
    assert out.positive_rank.tolist() == [0, 2, -1]
    assert out.hit_rank.tolist() == [0, 1, -1]
    assert np.isnan(out.positive_score[2]) and out.positive_score[0] == pytest.approx(1.0)


def test_float16_embeddings_are_ranked_in_float32():
    rng = np.random.default_rng(0)
    q, g = _unit(rng, 5, 16).astype(np.float16), _unit(rng, 40, 16).astype(np.float16)
    out = rank_gallery(q, g, 10)
    top, _, _ = _reference(
        q.astype(np.float32), g.astype(np.float32), 10, np.zeros(5, int), np.full((5, 1), -1)
    )
    np.testing.assert_array_equal(out.indices, top)


def test_chunks_fit_the_budget_and_bad_input_is_refused():
    assert chunk_rows(46_563, 1 << 28) == (1 << 28) // (46_563 * 5)
    assert chunk_rows(10, 1) == 1
    g = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="between 1 and the gallery size 3"):
        rank_gallery(np.ones((2, 4), np.float32), g, 4)
    with pytest.raises(ValueError, match="gallery is empty"):
        rank_gallery(np.ones((2, 4), np.float32), g[:0], 1)
    with pytest.raises(ValueError, match="shapes do not match"):
        rank_gallery(np.ones((2, 5), np.float32), g, 1)
