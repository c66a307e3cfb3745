"""Qwen2.5-VL judges (``Qwen/Qwen2.5-VL-7B-Instruct`` or any checkpoint of ``model_type`` "qwen2_5_vl").

The checkpoint's chat template interleaves ``<|vision_start|><|image_pad|><|vision_end|>`` with the
text items, so the prompt's pieces go in as content items in their order. Images keep their
aspect ratio (sides rounded to multiples of 28 within the processor's pixel budget): a 640x640
tile is 529 tokens, a 2048x1024 panorama 2,701. Positions are M-RoPE (``mrope_positions``): three
rows (time, height, width). The vision tower's window attention runs batched (``segment_attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.judges import segment_attention
from workers.judges.features import ImageFeatures
from workers.judges.hf_vlm import HFVisionJudge
from workers.judges.settings import VLMSettings


def mrope_positions(
    ids: torch.Tensor, image_token_id: int, grids: Sequence[Sequence[int] | torch.Tensor], merge: int
) -> torch.Tensor:
    """[3, tokens] M-RoPE positions of one unpadded sequence, as Qwen2.5-VL's ``get_rope_index``.

    Text tokens count up, the same on all three rows. An image of (t, h, w) patches is a grid of
    (t, h / merge, w / merge) tokens starting where the text stood: row 0 its time, row 1 its
    row, row 2 its column, each offset by the start; the text after it resumes at the start plus
    the larger side of the merged grid.
    """
    n = int(ids.shape[0])
    out = torch.empty((3, n), dtype=torch.long)
    is_image = (ids == image_token_id).numpy()
    edges = [0, *(np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1).tolist(), n]
    grid_iter = iter(grids)
    cur = 0
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if not is_image[a]:
            out[:, a:b] = torch.arange(cur, cur + b - a)
            cur += b - a
            continue
        at = a
        while at < b:  # images side by side form one run: split it by their grids
            t, h, w = (int(x) for x in next(grid_iter))
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            out[:, at : at + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(h, w) // merge
            at += count
    return out


class QwenVLJudge(HFVisionJudge):
    name = "qwen2.5-vl"
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    position_dims = 3

    def _setup(self, hf_model: Any, processor: Any, model: str, revision: str, settings: VLMSettings) -> None:
        super()._setup(hf_model, processor, model, revision, settings)
        self.merge = int(self.hf.config.vision_config.spatial_merge_size)
        segment_attention.install(self.hf.model.visual)

    def chat_text(self, pieces: list[str | int]) -> str:
        content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p} for p in pieces]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def preprocess(self, image: Image.Image) -> Any:
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    def encode(self, prepared: list[Any]) -> list[ImageFeatures]:
        pixels = torch.cat([p for p, _ in prepared]).to(self.device, self.dtype)
        grid = torch.stack([g for _, g in prepared])
        out = self.hf.model.get_image_features(pixels, grid.to(self.device), return_dict=True)
        return [
            ImageFeatures(embeds=f.to(self.dtype), grid_thw=g)
            for f, g in zip(out.pooler_output, grid, strict=True)
        ]

    def position_ids(self, ids: torch.Tensor, feats: list[ImageFeatures]) -> torch.Tensor:
        return mrope_positions(ids, self.image_token_id, [f.grid_thw for f in feats], self.merge)
