"""Key-value caches of shared prompt prefixes, and the per-batch past a forward pass reads them from.

A pairwise prompt is [chat header, instruction, panorama][first tile][second tile, question].
Level 1 (header to panorama) is the same for every comparison of a query; level 2 (level 1 plus
the first-shown tile) for every comparison that shows that tile first. Each level's keys and
values are computed once and kept (``PrefixCache``, least recently used out first, bounded in
bytes), so later comparisons, in this batch or a later round, run only what follows.

``BatchPast`` lays a batch's prefixes side by side, left-padded to one length, for all layers in
one buffer with room after them for the tokens the pass adds; ``BatchPast.cache`` hands it to
transformers as a ``DynamicCache`` whose layers write the pass's keys and values into that room
(no per-layer concatenation: a 7B Llama holds 0.5 MB per token over its layers), from where a new
level is cut (``added``) or greedy decoding continues (``full_cache``).
Nothing here depends on a model family; the tensors are [layers, 2 (k, v), kv_heads, tokens, head_dim].
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from workers.judges.lru import ByteLRU


@dataclass
class PrefixKV:
    """The keys and values one prefix level adds on top of the levels before it."""

    kv: torch.Tensor  # [layers, 2, kv_heads, tokens, head_dim]

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache(ByteLRU[PrefixKV]):
    """Prefix key -> PrefixKV on the model's device; a key names the model revision, the prefix's
    tokens (chat template and prompt) and the images in it (ground, then first-shown tile)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda p: p.nbytes)


class _PastLayer(DynamicLayer):
    """One decoder layer's slice of a batch buffer: the past, then room for the pass's own tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int) -> None:
        super().__init__()
        self.buffer_keys, self.buffer_values = keys, values  # [rows, kv_heads, past + room, head_dim]
        self.past = past
        self.keys, self.values = keys[:, :, :past], values[:, :, :past]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.past

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        end = self.past + key_states.shape[-2]
        if end > self.buffer_keys.shape[-2]:
            raise RuntimeError(f"{key_states.shape[-2]} new tokens do not fit the batch buffer")
        self.buffer_keys[:, :, self.past : end] = key_states
        self.buffer_values[:, :, self.past : end] = value_states
        return self.buffer_keys[:, :, :end], self.buffer_values[:, :, :end]


class BatchPast:
    """Each row's prefix parts (level 1, then level 2, ...) left-padded to one length, for every
    layer in one buffer that also has room for the ``room`` tokens a pass adds after them."""

    def __init__(
        self,
        rows: Sequence[Sequence[PrefixKV]],
        *,
        room: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        lengths = [sum(p.length for p in parts) for parts in rows]
        self.length = max(lengths, default=0)
        n = len(rows)
        shape = (layers, 2, n, kv_heads, self.length + room, head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)
        mask = torch.zeros((n, self.length), dtype=torch.long)
        for r, (parts, total) in enumerate(zip(rows, lengths, strict=True)):
            at = self.length - total
            if at:  # left padding: masked out, but must be finite (0 x NaN is NaN)
                self.kv[:, :, r, :, :at] = 0
            mask[r, at:] = 1
            for part in parts:
                self.kv[:, :, r, :, at : at + part.length] = part.kv
                at += part.length
        self.mask = mask.to(device)

    def cache(self) -> DynamicCache:
        """A DynamicCache over this past for one forward pass, which writes its own keys and values
        into the room after it (read back with ``added`` and ``full_cache``)."""
        cache = DynamicCache()
        cache.layers = [
            _PastLayer(self.kv[i, 0], self.kv[i, 1], self.length) for i in range(self.kv.shape[0])
        ]
        return cache

    def added(self, row: int, length: int) -> PrefixKV:
        """The first ``length`` keys and values the last pass added for ``row``: a new prefix level."""
        return PrefixKV(self.kv[:, :, row, :, self.length : self.length + length].clone())

    def full_cache(self, length: int) -> DynamicCache:
        """A plain growing DynamicCache of this past and the ``length`` tokens the last pass added
        (greedy decoding continues from it)."""
        end = self.length + length
        return DynamicCache(
            [(self.kv[i, 0, :, :, :end], self.kv[i, 1, :, :, :end]) for i in range(self.kv.shape[0])]
        )


def cache_keyword(language_model: Any) -> str:
    """The name the language model's forward takes its cache by (``cache`` from transformers 5.24)."""
    params = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_key(revision: str, ids: torch.Tensor, images: Sequence[Hashable]) -> tuple:
    """A prefix level's cache key: the model revision, a digest of its token ids (chat template,
    prompt text, image slots) and its images' keys (path, mtime, size)."""
    digest = hashlib.blake2b(ids.numpy().astype("int64").tobytes(), digest_size=16).hexdigest()
    return (revision, digest, tuple(images))
