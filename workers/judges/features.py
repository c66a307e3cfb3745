"""Vision features of one image as the language model sees it, and the cache that keeps them.

An image is encoded once per worker however many judgments show it (in a merge sort of 20 a tile
appears in about six comparisons and the panorama in all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.judges.lru import ByteLRU


@dataclass
class ImageFeatures:
    """Projected vision features (and Qwen's patch grid) of one image."""

    embeds: torch.Tensor  # [tokens, hidden], on the model's device and dtype
    grid_thw: torch.Tensor | None = None  # Qwen2.5-VL: (t, h, w) patches before merging, on the CPU

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class FeatureCache(ByteLRU[ImageFeatures]):
    """Image key (path, mtime, size) -> ImageFeatures, least recently used first out."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda f: f.nbytes)
