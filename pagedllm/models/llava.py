"""LLaVA-1.5 and LLaVA-NeXT: a Llama-family decoder and a CLIP / SigLIP image encoder with its projector (and NeXT's
tiling), whose rows take the place of each image's `<image>` tokens (llava_vision.py)."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.llava_vision import LlavaImageEncoder
from pagedllm.models.vision_language import VisionLanguageModel
from pagedllm.multimodal.inputs import ImageItem


class LlavaForConditionalGeneration(VisionLanguageModel, LlamaForCausalLM):
    vision_prefix = "vision."
    # transformers' saved layout, then its in-memory one (the name after the prefix is the encoder's own)
    checkpoint_vision_prefixes = ("vision_tower", "multi_modal_projector", "image_newline", "model.vision_tower",
                                  "model.multi_modal_projector", "model.image_newline")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vision = LlavaImageEncoder(config)
        self.init_vision(config)

    def load_vision_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.vision.load_weights([(name.removeprefix("model."), tensor)])

    def encode_images(self, items: list[ImageItem]) -> list[torch.Tensor]:
        weight = self.vision.multi_modal_projector.linear_1.weight
        if self.vision.pinpoints is None:  # fixed size: one batch
            pixels = torch.cat([item.data["pixel_values"] for item in items]).to(weight.device, weight.dtype)
            return self.vision(pixels)
        return [self.vision(item.data["pixel_values"].to(weight.device, weight.dtype), item.data["image_sizes"])[0]
                for item in items]


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    pass
