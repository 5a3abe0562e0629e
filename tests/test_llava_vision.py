"""LLaVA-1.5 / LLaVA-NeXT image encoders (pagedllm/models/llava_vision.py) against transformers: per-image features
(vision tower, feature-layer selection, projector, NeXT's anyres packing) from real processor outputs, and the
placeholder count per image. Float32 on CPU, tiny random-weight checkpoints (tests/reference/llava.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("PIL")  # transformers' image processors need Pillow (or torchvision)

from pagedllm.models.llava_vision import LlavaImageEncoder, llava_image_token_count  # noqa: E402
from tests.reference.llava import make_test_image, make_tiny_llava  # noqa: E402

# (width, height): tall, wide, square, and NeXT's other grids
IMAGE_SIZES = [(40, 60), (90, 30), (56, 56), (200, 50), (30, 130), (43, 42)]
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
CASES = {  # name: make_tiny_llava kwargs
    "clip": dict(),
    "clip-full-layers": dict(strategy="full", feature_layer=[-2, -1], seed=1),
    "siglip": dict(vision="siglip", feature_layer=[1, -1], seed=2),
    "next-clip": dict(next=True, seed=3),
    "next-siglip": dict(next=True, vision="siglip", seed=4),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("llava")
    cache: dict[str, tuple[Any, Any, LlavaImageEncoder, str]] = {}

    def get(case: str) -> tuple[Any, Any, LlavaImageEncoder, str]:
        if case not in cache:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path = make_tiny_llava(str(root / case), **CASES[case])
            with torch.inference_mode(False):  # first use may be inside a test's inference mode: keep weights normal
                hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
                with torch.device("meta"):  # as the engine's loader builds models
                    ours = LlavaImageEncoder(hf.config)
                ours = ours.to_empty(device="cpu")
                loaded = ours.load_weights(_checkpoint(path))
            assert loaded == set(dict(ours.named_parameters())), "every parameter comes from the checkpoint"
            cache[case] = (hf, AutoProcessor.from_pretrained(path), ours.eval(), path)
        return cache[case]

    return get


def _checkpoint(path: str) -> list[tuple[str, torch.Tensor]]:
    """The encoder's tensors of a saved checkpoint (transformers 5 saves them at the top level)."""
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return [(k, f.get_tensor(k)) for k in f.keys() if not k.startswith(("language_model.", "lm_head."))]


def _inputs(processor: Any, images: list[Any]) -> Any:
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    return processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_features_match_transformers(tiny: Any, case: str) -> None:
    hf, processor, ours, _ = tiny(case)
    images = [make_test_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    inputs = _inputs(processor, images)
    if "image_sizes" in inputs:  # NeXT: tiles padded to the longest image's count, original (height, width)
        expected = hf.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        got = ours(inputs["pixel_values"], inputs["image_sizes"])
    else:
        expected = hf.model.get_image_features(inputs["pixel_values"]).pooler_output
        got = ours(inputs["pixel_values"])
    assert len(got) == len(images)
    per_image = (inputs["input_ids"] == hf.config.image_token_id).sum(dim=1).tolist()
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.shape == e.shape and g.shape[0] == per_image[i], (IMAGE_SIZES[i], g.shape, e.shape, per_image[i])
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    # What transformers scatters into the prompt's <image> rows, in order.
    embeds = hf.model.get_input_embeddings()(inputs["input_ids"])
    mask = hf.model.get_placeholder_mask(inputs["input_ids"], embeds, torch.cat(expected))
    assert int(mask[..., 0].sum()) == sum(g.shape[0] for g in got)


@pytest.mark.parametrize("case", ["clip", "clip-full-layers", "next-clip", "next-siglip"])
def test_token_count_matches_processor(tiny: Any, case: str) -> None:
    hf, processor, _, _ = tiny(case)
    sizes = IMAGE_SIZES + [(14, 14), (1000, 20), (20, 1000), (84, 85), (127, 83), (84, 42)]
    for seed, (w, h) in enumerate(sizes):
        ids = _inputs(processor, [make_test_image(w, h, seed)])["input_ids"]
        inserted = int((ids == hf.config.image_token_id).sum())
        assert llava_image_token_count(hf.config, (h, w)) == inserted, (case, (w, h))


def test_load_weights_names(tiny: Any) -> None:
    hf, _, ours, path = tiny("clip")
    # The hub's older layout (vision_tower.vision_model.*) is ours; transformers 5 saves vision_tower.* (tested above).
    state = dict(ours.state_dict())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in state
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight" in state
    assert "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" not in state  # past layer -2: not built
    assert ours.load_weights(state.items()) == set(state)
    # transformers 5's in-memory names, less the "model." the caller strips; its tower has no vision_model level.
    in_memory = [(k[len("model."):], v) for k, v in hf.state_dict().items() if k.startswith("model.vision_tower.")]
    assert in_memory[0][0].startswith("vision_tower.embeddings.")
    assert ours.load_weights(in_memory) == {k for k in state if k.startswith("vision_tower.")}
    with pytest.raises(KeyError, match="language_model"):
        ours.load_weights([("language_model.model.norm.weight", torch.zeros(64))])
    # Skipped: the last layer (the feature layer is -2) and CLIP's post-LayerNorm.
    skipped = [(k, v) for k, v in _checkpoint(path) if ".layers.2." in k or "post_layernorm" in k]
    assert skipped and ours.load_weights(skipped) == set()


@torch.inference_mode()
def test_half_precision(tiny: Any) -> None:
    hf, processor, ours, path = tiny("next-clip")
    inputs = _inputs(processor, [make_test_image(40, 60, 0), make_test_image(56, 56, 1)])
    reference = ours(inputs["pixel_values"], inputs["image_sizes"])
    with torch.device("meta"):
        half = LlavaImageEncoder(hf.config).to(torch.bfloat16)
    half = half.to_empty(device="cpu")
    half.load_weights(_checkpoint(path))
    for r, g in zip(reference, half(inputs["pixel_values"], inputs["image_sizes"])):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape
        torch.testing.assert_close(g.float(), r, atol=0.1, rtol=0.05)
