"""A tiny random-weight Gemma 3 with images (Gemma3ForConditionalGeneration) written by transformers itself, with a
real processor: Gemma3ImageProcessor sized for the tiny SigLIP tower, the bundled SmolLM2 tokenizer plus Gemma 3's
image and turn tokens, a Gemma-style chat template; `AutoProcessor` and `Gemma3ForConditionalGeneration` load it.

Local layers have a 16-token window, as long as an image's 16 tokens, so windows cut through images; the decoder's
and projector's norms are random and the embeddings scaled down by sqrt(hidden), as tests/reference/models.py does
for Gemma (transformers starts Gemma's norms at zero and the projection weight at zero)."""

from __future__ import annotations

import os
from typing import Any

import torch

IMAGE_SIZE, PATCH_SIZE = 56, 7  # 8 x 8 patches, average-pooled 2 x 2 into 16 image tokens
MM_TOKENS = 16
WINDOW = 16
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_tiny_gemma3_mm(path: str, seed: int = 0) -> str:
    """Saves the model and its processor to `path` (kept if it already holds a config.json)."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from pagedllm.models.gguf import resolve_model

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None), extra_special_tokens=IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=(len(tokenizer) + 63) // 64 * 64, max_position_embeddings=1024, rms_norm_eps=1e-6,
        sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        initializer_range=0.25,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False, layer_norm_eps=1e-6)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.normal_(0, 0.3)
            elif name.endswith("bias") or "mm_soft_emb_norm" in name:
                p.normal_(0, 0.2)
            elif "layer_norm" in name or "layernorm" in name:  # the tower's LayerNorms' weights
                p.normal_(1.0, 0.2)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
        model.get_input_embeddings().weight.mul_(text["hidden_size"] ** -0.5)
    model.save_pretrained(path)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=MM_TOKENS)
    processor.save_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE  # the engine's own chat rendering reads the tokenizer's
    tokenizer.save_pretrained(path)
    return path


def load_gemma3_mm(path: str) -> tuple[Any, Any]:
    """transformers' processor and model (float32, eval)."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    return processor, Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
