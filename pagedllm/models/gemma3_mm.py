"""Gemma 3 with images: the Gemma 3 decoder (gemma.py) and a SigLIP tower whose last layer, after its post-LayerNorm,
is average-pooled to `mm_tokens_per_image` rows per image, normed (Gemma's RMSNorm, 1 + weight) and projected to
the decoder's width; those rows take the place of the image's `<image_soft_token>`s (processor.py wraps them in
"\\n\\n<start_of_image>" ... "<end_of_image>\\n\\n").

Unlike the other vision-language models, an image's tokens attend to each other both ways (text stays causal), as
transformers masks them: the class sets `bidirectional_images`, so the runner gives each query of such a step the
last key it sees (the image's last token for an image token) and the scheduler computes an image in one step.
The image rows replace the token embeddings after Gemma's sqrt(hidden) scaling, as in transformers.

Checkpoint names: transformers 5 saves `language_model.model.…`, `vision_tower.…` and `multi_modal_projector.…`;
hub checkpoints have the tower under `vision_tower.vision_model.…`; both load."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.sharding import load_whole
from pagedllm.models.gemma import Gemma3ForCausalLM
from pagedllm.models.llava_vision import VisionTower
from pagedllm.models.vision_language import VisionLanguageModel
from pagedllm.multimodal.inputs import ImageItem


class _SoftEmbNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class Gemma3Projector(nn.Module):
    """[images, patches, vision hidden] -> [images, mm_tokens_per_image, text hidden]: the patch grid average-pooled
    in square windows, normed, then multiplied by mm_input_projection_weight [vision hidden, text hidden]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size  # patches per side
        self.kernel = self.side // int(config.mm_tokens_per_image**0.5)
        if self.kernel < 1 or (self.side // self.kernel) ** 2 != config.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {config.mm_tokens_per_image} is not a square pooling of the "
                             f"{self.side}x{self.side} patch grid.")
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision.hidden_size, config.text_config.hidden_size))
        self.mm_soft_emb_norm = _SoftEmbNorm(vision.hidden_size, vision.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.transpose(1, 2).unflatten(-1, (self.side, self.side))  # [images, hidden, side, side]
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class Gemma3ImageEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.vision_tower = VisionTower(config.vision_config, -1, post_layernorm=True)
        self.multi_modal_projector = Gemma3Projector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors by their names relative to Gemma 3's model (with or without `model.`, the tower with or
        without `vision_model.`); SigLIP's pooling head, which Gemma 3 never runs, is skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                name = "vision_tower.vision_model." + name[len("vision_tower."):]
            if name.startswith("vision_tower.vision_model.head.") or name.endswith("embeddings.position_ids"):
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in Gemma 3's image encoder.")
            load_whole(params[name], tensor, name)  # shape checked
            loaded.add(name)
        return loaded


class Gemma3ForConditionalGeneration(VisionLanguageModel, Gemma3ForCausalLM):
    vision_prefix = "vision."
    checkpoint_vision_prefixes = ("vision_tower", "multi_modal_projector", "model.vision_tower",
                                  "model.multi_modal_projector")
    bidirectional_images = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vision = Gemma3ImageEncoder(config)
        self.init_vision(config)
        # transformers looks an out-of-vocabulary image token up as id 0 (its row is replaced anyway)
        self.image_token_oov = config.image_token_index >= config.vocab_size
        self.image_token = config.image_token_index

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.image_token_oov:
            input_ids = input_ids.masked_fill(input_ids == self.image_token, 0)
        return self.model.embed(input_ids)

    def load_vision_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.vision.load_weights([(name, tensor)])

    def encode_images(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """One batch through the tower: every item is one fixed-size picture (an image, or a pan-and-scan crop)."""
        weight = self.vision.multi_modal_projector.mm_input_projection_weight
        pixels = torch.cat([item.data["pixel_values"] for item in items]).to(weight.device, weight.dtype)
        return list(self.vision(pixels).unbind(0))
