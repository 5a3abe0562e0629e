"""Qwen2-VL / Qwen2.5-VL vision towers and M-RoPE positions against transformers (float32, CPU), on tiny random
checkpoints and images made by the real image processor."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("PIL", reason="transformers' Qwen2-VL image processor needs Pillow (or torchvision)")

from pagedllm.models.qwen2_vl_vision import Qwen2VisionTransformer, image_token_count, mrope_positions  # noqa: E402
from tests.reference.qwen2_vl import load_processor, make_test_image, make_tiny_qwen2_vl  # noqa: E402

VERSIONS = ["qwen2_vl", "qwen2_5_vl"]
# (width, height): 4x4, 6x8, 6x10 patches; 8x12 patches makes 2x3 windows of 2x2 merge units in 2.5-VL, and the
# odd merged grids (3x5, 3x4) leave partial windows.
IMAGE_SETS = {
    "one-small": [(56, 56)],
    "one-tall": [(112, 84)],
    "one-windows": [(168, 112)],
    "several": [(140, 84), (56, 56), (168, 112), (84, 112)],
}


class _Setup:
    def __init__(self, path: str, version: str) -> None:
        from transformers import AutoModelForImageTextToText

        self.path, self.version = path, version
        self.hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = load_processor(path)
        self.config = self.hf.config
        with torch.device("meta"):  # built as the engine's loader builds models, then materialised and loaded
            tower = Qwen2VisionTransformer(self.config.vision_config, version)
        self.tower = tower.to_empty(device="cpu").eval()
        weights = [(n, t) for n, t in load_file(f"{path}/model.safetensors").items() if n.startswith("visual.")]
        self.loaded = self.tower.load_weights(weights)

    def images(self, sizes: list[tuple[int, int]], seed: int = 0) -> list[Any]:
        return [make_test_image(w, h, seed + i) for i, (w, h) in enumerate(sizes)]

    def prompt(self, num_images: int) -> dict[str, Any]:
        content = [{"type": "text", "text": "Look"}] + [{"type": "image"}, {"type": "text", "text": "and"}] * num_images
        messages = [{"role": "user", "content": content + [{"type": "text", "text": "describe."}]}]
        return {"text": [self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]}


@pytest.fixture(scope="module", params=VERSIONS)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> _Setup:
    path = make_tiny_qwen2_vl(str(tmp_path_factory.mktemp(request.param)), request.param, seed=0)
    return _Setup(path, request.param)


def test_weights_load_by_name(setup: _Setup) -> None:
    assert setup.loaded == {n for n, _ in setup.tower.named_parameters()}
    with pytest.raises(KeyError, match="no place"):
        setup.tower.load_weights([("blocks.0.attn.nope.weight", torch.zeros(1))])


@pytest.mark.parametrize("images", list(IMAGE_SETS))
@torch.inference_mode()
def test_tower_matches_transformers(setup: _Setup, images: str) -> None:
    inputs = setup.processor.image_processor(images=setup.images(IMAGE_SETS[images]), return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    expected = torch.cat(setup.hf.model.get_image_features(pixels, image_grid_thw=grid).pooler_output)
    ours = setup.tower(pixels, grid)
    tokens = sum(image_token_count(tuple(g), 2) for g in grid.tolist())
    assert ours.shape == (tokens, setup.config.text_config.hidden_size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    if setup.version == "qwen2_5_vl" and images != "one-small":
        _, lengths = setup.tower._windows([tuple(g) for g in grid.tolist()])
        assert len([n for n in lengths if n]) > len(grid)  # windows really split the images


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_tower_16bit(setup: _Setup, dtype: torch.dtype) -> None:
    inputs = setup.processor.image_processor(images=setup.images(IMAGE_SETS["several"]), return_tensors="pt")
    reference = setup.tower(inputs["pixel_values"], inputs["image_grid_thw"])
    with torch.device("meta"):
        tower = Qwen2VisionTransformer(setup.config.vision_config)  # the version from vision_config.model_type
    tower = tower.to_empty(device="cpu").to(dtype)
    tower.load_weights(setup.tower.state_dict().items())
    out = tower(inputs["pixel_values"], inputs["image_grid_thw"])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=0.05 * reference.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_mrope_positions_match_get_rope_index(setup: _Setup, num_images: int) -> None:
    sizes = [(140, 84), (56, 56), (168, 112)][:num_images]
    inputs = setup.processor(**setup.prompt(num_images), images=setup.images(sizes) or None, return_tensors="pt")
    ids = inputs["input_ids"]
    grid = inputs.get("image_grid_thw")
    expected, expected_delta = setup.hf.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grid)
    cfg = setup.config
    grids = [tuple(g) for g in grid.tolist()] if grid is not None else []
    positions, delta = mrope_positions(ids[0].tolist(), grids, cfg.image_token_id, cfg.vision_start_token_id,
                                       cfg.vision_config.spatial_merge_size)
    assert positions.tolist() == expected[:, 0].tolist()
    assert delta == int(expected_delta[0, 0])
    # image_token_count: the processor's <|image_pad|> run per image
    runs = _runs(ids[0].tolist(), cfg.image_token_id)
    assert runs == [image_token_count(g, cfg.vision_config.spatial_merge_size) for g in grids]


def _runs(ids: list[int], token: int) -> list[int]:
    runs, count = [], 0
    for i in ids + [-1]:
        if i == token:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs
