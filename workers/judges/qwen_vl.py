"""Qwen2.5-VL judges (``Qwen/Qwen2.5-VL-7B-Instruct`` or any checkpoint of ``model_type`` "qwen2_5_vl").

The checkpoint's chat template interleaves ``<|vision_start|><|image_pad|><|vision_end|>`` with the
text items, so the prompt's pieces go in as content items in their order. Images keep their
aspect ratio (sides rounded to multiples of 28 within the processor's pixel budget): a 640x640
tile is 529 tokens. Positions are M-RoPE: three rows (time, height, width) from
``get_rope_index``, which needs ``mm_token_type_ids`` (the plain path passes every processor
output; without it the model silently falls back to 1-D positions).
"""

from __future__ import annotations

import torch
from PIL import Image

from workers.judges.hf_vlm import HFVisionJudge, ImageFeatures

IMAGE_TOKEN_TYPE = 1  # mm_token_type_ids: 0 text, 1 image, 2 video


class QwenVLJudge(HFVisionJudge):
    name = "qwen2.5-vl"
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    position_dims = 3

    def chat_text(self, pieces: list[str | int]) -> str:
        content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p} for p in pieces]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode_images(self, images: list[Image.Image]) -> list[ImageFeatures]:
        processed = self.processor.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        out = self.hf.model.get_image_features(
            processed["pixel_values"].to(self.device, self.dtype), grid.to(self.device), return_dict=True
        )
        return [
            ImageFeatures(embeds=f.to(self.dtype), grid_thw=g)
            for f, g in zip(out.pooler_output, grid, strict=True)
        ]

    def position_ids(self, ids: torch.Tensor, feats: list[ImageFeatures]) -> torch.Tensor:
        token_types = (ids == self.image_token_id).long() * IMAGE_TOKEN_TYPE
        grid = torch.stack([f.grid_thw for f in feats]) if feats else None
        pos, _ = self.hf.model.get_rope_index(ids[None], token_types[None], image_grid_thw=grid)
        return pos[:, 0]
