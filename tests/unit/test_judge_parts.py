"""The judge's parts that need no model: the byte-bounded cache, settings, image loading in
threads, answer tokens, segment attention, M-RoPE positions, the prefix key-value buffers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.judges.answer_tokens import AnswerTokenError, answer_token_ids, single_token_ids
from workers.judges.images import BadImage, load_image, map_images
from workers.judges.lru import ByteLRU
from workers.judges.prefix_kv import BatchPast, PrefixKV, prefix_key
from workers.judges.qwen_vl import mrope_positions
from workers.judges.segment_attention import segment_attention
from workers.judges.settings import VLMSettings

# -- the byte-bounded LRU ------------------------------------------------------------------------


def test_the_lru_keeps_the_most_recently_used_within_its_bytes():
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    lru.put("a", b"xxxx")
    lru.put("b", b"xxxx")
    assert lru.get("a") == b"xxxx"  # a is now the most recent
    lru.put("c", b"xxxx")  # 12 bytes > 10: the least recent (b) goes
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.bytes == 8 and (lru.hits, lru.misses, lru.evictions) == (1, 0, 1)
    assert lru.get("b") is None and lru.misses == 1
    lru.put("huge", b"x" * 11)  # heavier than the bound: not kept, nothing evicted for it
    assert "huge" not in lru and len(lru) == 2
    lru.put("a", b"xx")  # replacing an entry re-weighs it
    assert lru.bytes == 6
    lru.shrink_to(3)
    assert list(lru._items) == ["a"] and lru.bytes == 2
    assert lru.stats()["evictions"] == 2


# -- settings ----------------------------------------------------------------------------------


def test_cache_bounds_are_set_sizes_or_shares_of_free_gpu_memory(monkeypatch):
    monkeypatch.setenv("CVGL_VLM_PREFIX_CACHE_MB", "100")
    s = VLMSettings.resolve(device="cpu")
    assert s.cache_bytes("prefix", None) == 100 * 2**20
    assert s.cache_bytes("features", None) == 2048 * 2**20  # the CPU default
    gpu = VLMSettings("cuda", "bfloat16", 16, True, None, None, 8)
    assert gpu.cache_bytes("prefix", 100 * 2**30) == int(0.55 * 100 * 2**30)
    assert gpu.cache_bytes("features", 100 * 2**30) == int(0.08 * 100 * 2**30)
    monkeypatch.setenv("CVGL_VLM_FEATURE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="CVGL_VLM_FEATURE_CACHE_MB must be a number"):
        VLMSettings.resolve(device="cpu")
    monkeypatch.setenv("CVGL_VLM_FEATURE_CACHE_MB", "auto")
    monkeypatch.setenv("CVGL_VLM_LOADER_THREADS", "3")
    s = VLMSettings.resolve(device="cpu")
    assert s.feature_cache_mb is None and s.loader_threads == 3 and s.batch_size == 8


# -- images --------------------------------------------------------------------------------------


def test_images_load_in_threads_in_order_and_the_first_bad_one_raises(tmp_path):
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16 + i, 16), (i, 0, 0)).save(paths[-1])
    seen_threads = set()

    def load(p: Path) -> Image.Image:
        seen_threads.add(threading.get_ident())
        return load_image(p)

    images = map_images(load, paths, threads=4)
    assert [im.size[0] for im in images] == [16 + i for i in range(12)]  # in the order asked
    assert len(seen_threads) > 1
    with pytest.raises(BadImage, match="image not found"):
        map_images(load_image, [*paths[:3], tmp_path / "missing.png"], threads=4)


# -- answer tokens -------------------------------------------------------------------------------


def _bpe(vocab_words: list[str], merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_choice_of_two_tokens_is_refused_not_read_by_its_first():
    """ "Yes" and "Yeah" would both be read from "Y" if only first tokens were compared."""
    tok = _bpe(list("Q:?YesahNo"), [("N", "o"), ("Y", "e"), ("Ye", "s")])
    assert single_token_ids(tok, "Q?", [" Yes", " No"])  # one token each: fine
    with pytest.raises(AnswerTokenError, match="'Yeah' is 3 tokens"):
        answer_token_ids(tok, "Q?\n", ["Yes", "Yeah"])


# -- segment attention -----------------------------------------------------------------------------


def test_segment_attention_equals_one_call_per_segment():
    torch.manual_seed(0)
    n, heads, dim = 37, 3, 8
    q, k, v = (torch.randn(n, heads, dim) for _ in range(3))
    bounds = [0, 8, 16, 24, 30, 30, 33, 37]  # equal and unequal lengths, one empty segment
    out = segment_attention(q, k, v, torch.tensor(bounds), dim**-0.5)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if a == b:
            continue
        ref = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0]
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-6)
    # A control: attending across segments would give something else.
    full = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
    assert (out - full).abs().max() > 0.1


def test_segment_groups_are_worked_out_once_per_boundary_tensor():
    """Every windowed block of one vision pass gets the same boundary tensor: one host copy, not 28."""
    from workers.judges import segment_attention as sa

    cu = torch.tensor([0, 4, 8, 11])
    first = sa.segment_groups(cu)
    assert sa.segment_groups(cu) is first
    assert [(n, length) for n, length, _ in first] == [(2, 4), (1, 3)]
    other = torch.tensor([0, 4, 8, 11])  # equal values, another pass: worked out again
    assert sa.segment_groups(other) is not first
    key = id(cu)
    del cu, first
    assert key not in sa._GROUPS  # gone with its tensor


# -- M-RoPE positions ---------------------------------------------------------------------------------


def test_mrope_positions_lay_each_image_out_as_its_merged_grid():
    img = 9
    # 2 text tokens, an image of 2x3 merged tokens (grid 1x4x6 patches, merge 2), 3 text tokens.
    ids = torch.tensor([1, 2] + [img] * 6 + [3, 4, 5])
    pos = mrope_positions(ids, img, [(1, 4, 6)], merge=2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3  # text: the same on all three rows
    assert pos[0, 2:8].tolist() == [2] * 6  # time: the start
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]  # rows
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]  # columns
    assert pos[:, 8:].tolist() == [[5, 6, 7]] * 3  # text resumes at start + the larger side (3)
    # Two images side by side form one run of image tokens: split by their grids.
    both = mrope_positions(torch.tensor([1] + [img] * 5), img, [(1, 2, 2), (1, 2, 8)], merge=2)
    assert both[:, 1].tolist() == [1, 1, 1] and both[:, 2:].tolist() == [[2] * 4, [2] * 4, [2, 3, 4, 5]]


# -- prefix key-value buffers --------------------------------------------------------------------------


def _kv(layers: int, heads: int, length: int, dim: int, fill: float) -> PrefixKV:
    return PrefixKV(torch.full((layers, 2, heads, length, dim), fill))


def test_a_batch_past_lays_prefixes_left_padded_and_takes_the_new_tokens_after_them():
    a1, a2, b1 = _kv(2, 1, 3, 4, 1.0), _kv(2, 1, 2, 4, 2.0), _kv(2, 1, 4, 4, 3.0)
    past = BatchPast(
        [[a1, a2], [b1]],
        room=2,
        layers=2,
        kv_heads=1,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert past.length == 5 and past.mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    keys = past.kv[:, 0, :, 0, :5, 0]  # [layers, rows, tokens]
    assert keys[0].tolist() == [[1, 1, 1, 2, 2], [0, 3, 3, 3, 3]]  # padding is zero, not garbage
    cache = past.cache()
    assert cache.get_seq_length() == 5
    new_k, new_v = torch.full((2, 1, 2, 4), 7.0), torch.full((2, 1, 2, 4), 8.0)
    k, v = cache.layers[1].update(new_k, new_v)
    assert k.shape == (2, 1, 7, 4) and k[0, 0, :, 0].tolist() == [1, 1, 1, 2, 2, 7, 7]
    assert v[1, 0, :, 0].tolist() == [0, 3, 3, 3, 3, 8, 8]
    cache.layers[0].update(new_k, new_v)
    level = past.added(row=1, length=1)  # a new level: what the pass added, for one row
    assert level.kv.shape == (2, 2, 1, 1, 4) and level.kv[:, 0].unique().tolist() == [7.0]
    assert level.kv.is_contiguous() and level.nbytes == 2 * 2 * 1 * 1 * 4 * 4
    grown = past.full_cache(2)
    assert grown.get_seq_length() == 7
    with pytest.raises(RuntimeError, match="do not fit"):
        cache.layers[0].update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))


def test_prefix_keys_name_the_revision_the_tokens_and_the_images():
    ids = torch.tensor([1, 2, 3])
    base = prefix_key("rev", ids, [("g.jpg", 1, 2)])
    assert base == prefix_key("rev", ids.clone(), [("g.jpg", 1, 2)])
    assert base != prefix_key("other", ids, [("g.jpg", 1, 2)])
    assert base != prefix_key("rev", torch.tensor([1, 2, 4]), [("g.jpg", 1, 2)])
    assert base != prefix_key("rev", ids, [("g.jpg", 1, 3)])  # the file was rewritten


def test_an_image_of_sixteen_bit_depth_is_scaled_not_clipped(tmp_path):
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert rgb.max() > 200 and len(np.unique(rgb[..., 0])) > 32
