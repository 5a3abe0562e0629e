"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints, written by transformers itself (config, weights,
processor: image processor, tokenizer, chat template), and seeded random test images (no downloads).

The tokenizer is the bundled SmolLM2's plus Qwen's vision tokens; the vision towers are small but not degenerate:
several blocks, 2.5-VL's window attention on all but the full-attention blocks, windows small enough (2x2 merged
tokens, 56 pixels) that a test image spans several."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Renders content lists as Qwen2-VL's template does: each image part becomes its three placeholder tokens (the
# processor then repeats <|image_pad|> once per merged image token).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.1,
    # head_dim 16: 8 rotary frequencies split t/h/w
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)

VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, initializer_range=0.1),
    "qwen2_5_vl": dict(
        depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, window_size=56,
        fullatt_block_indexes=[1, 3], initializer_range=0.1,
    ),
}

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64  # at most 256 patches (64 merged tokens) per image


def make_test_image(width: int, height: int, seed: int) -> Any:
    """A random RGB PIL image of width x height."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def make_tiny_qwen2_vl(path: str, version: str = "qwen2_vl", seed: int = 0) -> str:
    """Saves a random Qwen2-VL (`version` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") model and its processor to `path`
    (kept if it already holds a config.json)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from pagedllm.models.gguf import resolve_model

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    missing = [t for t in ["<|im_start|>", "<|im_end|>"] if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing + VISION_TOKENS, special_tokens=True)
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    model_cls, config_cls = _classes(version)
    config = config_cls(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(VISION_CONFIGS[version], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers starts biases at zero and norms at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    # The processor's parts as a Hub checkpoint lays them out (preprocessor_config.json, tokenizer files,
    # chat_template.jinja): transformers 5 cannot build or save a Qwen2VLProcessor without torchvision (its video
    # processor), but AutoProcessor loads this layout wherever torchvision is installed (see load_processor).
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2,
                          temporal_patch_size=2).save_pretrained(path)
    return path


def load_processor(path: str) -> Any:
    """AutoProcessor.from_pretrained(path); without torchvision (whose absence makes transformers 5 refuse a
    Qwen2VLProcessor outright), the same processor built from the directory's parts with no video processor."""
    from unittest import mock

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    check = ProcessorMixin.check_argument_for_proper_class
    lenient = lambda self, name, arg: None if arg is None else check(self, name, arg)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(path)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return Qwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                                video_processor=None, chat_template=tokenizer.chat_template)


def _classes(version: str) -> tuple[type, type]:
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration, Qwen2VLConfig
    if version == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
    raise ValueError(f"unknown version {version!r}: 'qwen2_vl' or 'qwen2_5_vl'")
