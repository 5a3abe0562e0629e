"""Tiny random-weight LLaVA-1.5 / LLaVA-NeXT checkpoints written by transformers itself, with a real processor
(image processor sized for the tiny tower, the bundled SmolLM2 tokenizer plus an `<image>` token, a chat template),
so `AutoProcessor` and `Llava(Next)ForConditionalGeneration.from_pretrained` load them as they would a hub model."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

IMAGE_SIZE = 42  # 3 x 3 patches of 14 pixels per image (per tile, for NeXT)
PATCH_SIZE = 14
# NeXT's tile grids (height, width): 1x2, 2x1, 2x2, 1x3, 3x1 tiles.
GRID_PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126], [126, 42]]

# LLaVA style: "USER: <image>\nWhat is this? ASSISTANT: ...</s>"; content is a string or a list of typed parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' ' if message['role'] == 'user' else eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _vision_config(vision: str) -> dict[str, Any]:
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    if vision == "clip":
        return dict(model_type="clip_vision_model", hidden_act="quick_gelu", projection_dim=32, **common)
    if vision == "siglip":
        return dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", **common)
    raise ValueError(f"vision must be 'clip' or 'siglip', got {vision!r}")


def make_tiny_llava(path: str, next: bool = False, seed: int = 0, vision: str = "clip",
                    feature_layer: int | list[int] = -2, strategy: str | None = None) -> str:
    """Saves a random LLaVA-1.5 (next=False) or LLaVA-NeXT model and its processor to `path`. vision: "clip" or
    "siglip"; strategy: vision_feature_select_strategy (default: "default" for CLIP, "full" for SigLIP, which has
    no CLS token to drop)."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor, LlavaProcessor, SiglipImageProcessor)

    from pagedllm.models.gguf import resolve_model

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    strategy = strategy or ("default" if vision == "clip" else "full")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=(len(tokenizer) + 63) // 64 * 64, max_position_embeddings=1024,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, initializer_range=0.25)
    side = IMAGE_SIZE // PATCH_SIZE
    extra = int(vision == "clip")  # the CLS token the processor counts as an additional image token
    kwargs: dict[str, Any] = dict(
        vision_config=_vision_config(vision), text_config=text, image_token_index=image_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_seq_length=side * side + extra - int(strategy == "default"), tie_word_embeddings=False,
    )
    if next:
        config = LlavaNextConfig(image_grid_pinpoints=GRID_PINPOINTS, **kwargs)
    else:
        config = LlavaConfig(**kwargs)
    torch.manual_seed(seed)
    model_cls = LlavaNextForConditionalGeneration if next else LlavaForConditionalGeneration
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():  # transformers starts norms at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)

    sizes = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if vision == "siglip":  # SigLIP's normalisation (mean = std = 0.5), as its checkpoints ship
        sizes.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if next:
        image_processor: Any = LlavaNextImageProcessor(image_grid_pinpoints=GRID_PINPOINTS, **sizes)
    elif vision == "clip":
        image_processor = CLIPImageProcessor(**sizes)
    else:
        image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor_cls = LlavaNextProcessor if next else LlavaProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                              vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                              num_additional_image_tokens=extra)
    processor.save_pretrained(path)
    return path


def make_test_image(width: int, height: int, seed: int) -> Any:
    """A random RGB PIL image (smooth gradients plus noise, so resizing has something to keep)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / max(width + height - 2, 1)], -1)
    pixels = np.clip(base * 255 * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 40, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))  # H x W x 3 uint8: RGB
