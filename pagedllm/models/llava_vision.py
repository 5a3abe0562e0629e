"""The image encoders of LLaVA-1.5 and LLaVA-NeXT: a CLIP or SigLIP vision transformer, the multimodal projector,
and (NeXT) the "anyres" packing of tile features, giving per image the rows that replace its `<image>` placeholders
in the language model's input embeddings.

The tower runs each image (each tile, for NeXT) whole, with full attention among its patches, and only up to the
deepest layer LLaVA reads (`vision_feature_layer`, indexed as transformers' hidden_states: 0 is the embeddings after
CLIP's pre-LayerNorm, -1 the last layer's output), so a checkpoint's last layers and post-LayerNorm go unused.

Parameter names are transformers' relative to LLaVA's model (`vision_tower.vision_model.…`,
`multi_modal_projector.…`, `image_newline`). `load_weights` also takes the tower without `vision_model.`, as
transformers 5 saves it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.sharding import load_whole

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}
_TOWERS = ("clip_vision_model", "siglip_vision_model")
# Tower weights LLaVA may not use: a layer (group 1: its index), the post-LayerNorm, SigLIP's head, an old buffer.
_UNUSED = re.compile(r"vision_tower\.vision_model\.(?:encoder\.layers\.(\d+)\..+|post_layernorm\..+|head\..+|"
                     r"embeddings\.position_ids)")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported in LLaVA's encoder; supported: {list(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _feature_layers(vision_feature_layer: int | list[int], num_layers: int) -> list[int]:
    """LLaVA's feature layers as indices into [embeddings, layer 1 output, ..., layer L output]."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    if not layers or any(not -num_layers - 1 <= i <= num_layers for i in layers):
        raise ValueError(f"vision_feature_layer {vision_feature_layer!r} is out of range for {num_layers} layers.")
    return [i % (num_layers + 1) for i in layers]


class _Embeddings(nn.Module):
    def __init__(self, config: Any, clip: bool) -> None:
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        num_positions = (config.image_size // config.patch_size) ** 2 + int(clip)
        if clip:  # CLIP prepends a learned class token; SigLIP has none (and a biased patch conv)
            self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=not clip)
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the tower takes "
                             f"{self.image_size}x{self.image_size} images.")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class _SelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [images, tokens, hidden]; all tokens see each other
        q, k, v = (p(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class _MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    """Pre-LayerNorm block: x += attention(LN(x)), x += MLP(LN(x))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = _SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(config) for _ in range(num_layers))


class _VisionTransformer(nn.Module):
    def __init__(self, config: Any, num_layers: int, clip: bool, post_layernorm: bool) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config, clip)
        if clip:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic: HF's name)
        self.encoder = _Encoder(config, num_layers)
        if post_layernorm:
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class VisionTower(nn.Module):
    """A CLIP or SigLIP vision transformer up to the deepest of `feature_layers`: forward(pixel_values [N, 3, H, W])
    -> the selected hidden states concatenated on the feature axis, [N, tokens, hidden * len(feature_layers)].
    post_layernorm: the tower's whole output (`last_hidden_state`: the last layer, then the post-LayerNorm), as
    Gemma 3 reads it; then feature_layers must be the last layer alone."""

    def __init__(self, vision_config: Any, feature_layers: int | list[int], post_layernorm: bool = False) -> None:
        super().__init__()
        if vision_config.model_type not in _TOWERS:
            raise ValueError(f"vision tower {vision_config.model_type!r} is not supported; supported: {_TOWERS}")
        self.has_cls = vision_config.model_type == "clip_vision_model"
        self.feature_layers = _feature_layers(feature_layers, vision_config.num_hidden_layers)
        self.num_layers = max(self.feature_layers)
        if post_layernorm and self.feature_layers != [vision_config.num_hidden_layers]:
            raise ValueError("the post-LayerNorm follows the last layer: read that layer alone with it.")
        self.vision_model = _VisionTransformer(vision_config, self.num_layers, self.has_cls, post_layernorm)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = self.vision_model
        x = model.embeddings(pixel_values)
        if self.has_cls:
            x = model.pre_layrnorm(x)
        kept = {0: x} if 0 in self.feature_layers else {}  # only the selected states: a big tower has many
        for i, layer in enumerate(model.encoder.layers, start=1):
            x = layer(x)
            if i in self.feature_layers:
                kept[i] = x
        if hasattr(model, "post_layernorm"):
            return model.post_layernorm(x)
        return torch.cat([kept[i] for i in self.feature_layers], dim=-1)


class _Projector(nn.Module):
    def __init__(self, config: Any, in_features: int) -> None:
        super().__init__()
        hidden, bias = config.text_config.hidden_size, getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = _activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps most of the image's pixels once fitted inside it, then wastes least
    (LLaVA-NeXT's choice, which its processor and model both make)."""
    best, best_key = (0, 0), (-1, 0.0)
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(w * h - kept))
        if key > best_key:
            best, best_key = (h, w), key
    return best


def _padding(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """Where a rows x cols feature grid holds the processor's padding around a height x width image: (axis, pad),
    the axis (0 rows, 1 columns) with `pad` rows/columns of padding at each end. Float steps in transformers'
    order, so that rounding agrees."""
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return 0, pad
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 1, pad


class LlavaImageEncoder(nn.Module):
    """Vision tower + projector (+ anyres packing for LLaVA-NeXT). forward -> one [tokens_i, text_hidden] per image.
    LLaVA-1.5: forward(pixel_values [N, 3, H, W]); NeXT: forward(pixel_values [N, tiles, 3, H, W] (the tile axis
    padded to the longest, as the processor gives it), image_sizes [N, 2] (original height, width))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision = config.vision_config
        self.strategy = config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {self.strategy!r}")
        self.vision_tower = VisionTower(vision, config.vision_feature_layer)
        self.multi_modal_projector = _Projector(config, vision.hidden_size * len(self.vision_tower.feature_layers))
        self.pinpoints: list[list[int]] | None = getattr(config, "image_grid_pinpoints", None)
        self.tile, self.side = vision.image_size, vision.image_size // vision.patch_size  # pixels; patches per side
        if self.pinpoints is not None:
            if _tile_tokens(config) != self.side**2:
                raise ValueError("LLaVA-NeXT packs tiles of patch features only: use 'default' with a CLIP tower "
                                 "(drops its CLS token) or 'full' with SigLIP.")
            self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision_tower(pixel_values)
        return self.multi_modal_projector(x[:, 1:] if self.strategy == "default" else x)

    def forward(self, pixel_values: torch.Tensor,
                image_sizes: torch.Tensor | list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        if self.pinpoints is None:
            return list(self._features(pixel_values).unbind(0))
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the original height, width of each image).")
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        best = [_best_resolution(h, w, self.pinpoints) for h, w in sizes]
        grids = [(h // self.tile, w // self.tile) for h, w in best]
        counts = [1 + math.ceil(h / self.tile) * math.ceil(w / self.tile) for h, w in best]  # the processor's tiles
        # All real tiles of all images in one tower batch
        tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        per_image = self._features(tiles).split(counts)
        return [self._pack(f, g, s) for f, g, s in zip(per_image, grids, sizes)]

    def _pack(self, features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """[1 + tiles, side^2, hidden] -> base tile's features, then the tile grid's rows (image part only), each row
        followed by image_newline."""
        (gh, gw), s, d = grid, self.side, features.shape[-1]
        # tiles row-major over the grid, patches row-major in a tile -> one [gh * s, gw * s] grid of patches
        grid_features = features[1:].view(gh, gw, s, s, d).permute(0, 2, 1, 3, 4).reshape(gh * s, gw * s, d)
        axis, pad = _padding(gh * s, gw * s, *size)
        grid_features = grid_features.narrow(axis, pad, grid_features.shape[axis] - 2 * pad)
        rows = torch.cat([grid_features, self.image_newline.expand(grid_features.shape[0], 1, d)], dim=1)
        return torch.cat([features[0], rows.flatten(0, 1)])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors (names relative to this module) into the parameters; returns the names loaded.
        The tower's weights past the deepest feature layer (last layers, CLIP's post_layernorm, SigLIP's pooling
        head) are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                name = "vision_tower.vision_model." + name[len("vision_tower."):]  # transformers 5's saved layout
            if name not in params:
                unused = _UNUSED.fullmatch(name)
                if unused and int(unused.group(1) or self.vision_tower.num_layers) >= self.vision_tower.num_layers:
                    continue
                raise KeyError(f"checkpoint tensor {name!r} has no place in the LLaVA image encoder.")
            load_whole(params[name], tensor, name)  # shape checked
            loaded.add(name)
        return loaded


def _tile_tokens(config: Any) -> int:
    """Feature rows per image (per tile) after the select strategy: patches, plus CLIP's CLS unless dropped."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (vision.model_type == "clip_vision_model") - (config.vision_feature_select_strategy == "default")


def llava_image_token_count(config: Any, image_size: tuple[int, int]) -> int:
    """The `<image>` placeholders the processor puts in for one image of `image_size` (height, width)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if pinpoints is None:
        return _tile_tokens(config)
    height, width = image_size
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    best_h, best_w = _best_resolution(height, width, pinpoints)
    rows, cols = side * (best_h // vision.image_size), side * (best_w // vision.image_size)
    axis, pad = _padding(rows, cols, height, width)
    rows, cols = (rows - 2 * pad, cols) if axis == 0 else (rows, cols - 2 * pad)
    return _tile_tokens(config) + rows * (cols + 1)
