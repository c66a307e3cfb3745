"""LLaVA-1.5 judges (``llava-hf/llava-1.5-7b-hf`` or any checkpoint of ``model_type`` "llava").

The checkpoint's chat template renders every image before all the text, which would move the
panorama away from its placeholder; so the prompt's text, with the image tokens inline where its
placeholders stand (pieces joined by newlines, as the paper's code joins them), goes through the
template as one text item: ``USER: <text with <image> slots> ASSISTANT:``. Each image becomes 576
tokens (CLIP ViT-L/14 at 336 px, centre-cropped square, CLS dropped) of projected features.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from workers.judges.features import ImageFeatures
from workers.judges.hf_vlm import HFVisionJudge


class LlavaJudge(HFVisionJudge):
    name = "llava"
    family = "LLaVA-1.5"
    model_class = "LlavaForConditionalGeneration"
    position_dims = 1

    def chat_text(self, pieces: list[str | int]) -> str:
        body = "\n".join(self.image_token if isinstance(p, int) else p for p in pieces)
        messages = [{"role": "user", "content": [{"type": "text", "text": body}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def preprocess(self, image: Image.Image) -> Any:
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def encode(self, prepared: list[Any]) -> list[ImageFeatures]:
        pixels = torch.stack(prepared).to(self.device, self.dtype)
        # vision_feature_layer / select strategy come from the checkpoint's config.
        out = self.hf.model.get_image_features(pixel_values=pixels, return_dict=True)
        return [ImageFeatures(embeds=f.to(self.dtype)) for f in out.pooler_output]
