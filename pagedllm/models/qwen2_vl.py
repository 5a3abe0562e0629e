"""Qwen2-VL and Qwen2.5-VL: the Qwen2 decoder with M-RoPE, and a vision transformer (qwen2_vl_vision.py) whose merged
patch embeddings take the place of each image's `<|image_pad|>` tokens."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.models.qwen2 import Qwen2ForCausalLM
from pagedllm.models.qwen2_vl_vision import Qwen2VisionTransformer
from pagedllm.models.vision_language import VisionLanguageModel
from pagedllm.multimodal.inputs import ImageItem


class Qwen2VLForConditionalGeneration(VisionLanguageModel, Qwen2ForCausalLM):
    vision_prefix = "visual."
    checkpoint_vision_prefixes = ("model.visual.", "visual.")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.visual = Qwen2VisionTransformer(config.vision_config)
        self.init_vision(config)

    def load_vision_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.visual.load_weights([(name, tensor)])

    def encode_images(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """One batch through the tower: every image's patches, with their grids."""
        device, dtype = self.visual.patch_embed.proj.weight.device, self.visual.patch_embed.proj.weight.dtype
        pixels = torch.cat([item.data["pixel_values"] for item in items]).to(device, dtype)
        grids = torch.cat([item.data["image_grid_thw"] for item in items])
        return list(self.visual(pixels, grids).split([item.length for item in items]))


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):  # noqa: N801 - transformers' name
    pass
