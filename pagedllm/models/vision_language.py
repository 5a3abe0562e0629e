"""What the vision-language models share: a decoder (Llama, Qwen2, Gemma 3) whose input embeddings take the images'
embeddings in place of their placeholder tokens, and, for Qwen2-VL, multimodal rotary positions (M-RoPE). A model
whose image tokens attend to each other both ways (Gemma 3) sets `bidirectional_images`: the runner then gives its
steps with image tokens per-query key limits (attention/backend.py) and the scheduler computes each image whole.

The runner encodes images into its encoder cache (multimodal/encoder_cache.py) and hands a step's image rows in the
forward context; steps without image tokens (every decode) run the decoder exactly as a text model does, CUDA graphs
included. Checkpoints keep the decoder under `model.` / `lm_head.` (transformers' in-memory names, with
`model.language_model.` or `language_model.model.`, are renamed to those) and the vision part under its own prefix,
which the vision module loads itself."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.attention import current_mm_embeds
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.sharding import read_whole


def flatten_text_config(hf: Any) -> Any:
    """A vision-language config with its text model's fields also at the top (hidden_size, vocab_size, rope, ...),
    where the engine reads them; a text-only config as it is."""
    text = getattr(hf, "text_config", None)
    if text is None or getattr(hf, "vision_config", None) is None:
        return hf
    for key, value in text.to_dict().items():
        if getattr(hf, key, None) is None:
            setattr(hf, key, value)
    return hf


def mrope_sections(hf: Any) -> list[int] | None:
    """M-RoPE's rotary dims per axis (temporal, height, width), halved as transformers writes them; None: plain."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(hf, name, None) or {}
        if params.get("mrope_section"):
            return list(params["mrope_section"])
    return None


@contextlib.contextmanager
def mrope_rows(rotary: RotaryEmbedding, positions: torch.Tensor, sections: list[int]) -> Iterator[torch.Tensor]:
    """Under this, the shared cos/sin table is one row per token, each frequency taken at the token's position on its
    axis: the layers rotate with positions arange(tokens) (yielded), through the same kernels as 1-D positions."""
    table = rotary.cos_sin_cache
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections)).to(table.device)
    axis = torch.cat([axis, axis])  # the cos half, then the sin half
    rows = table[positions]  # [3, tokens, head_dim]
    rotary.cos_sin_cache = rows.gather(0, axis[None, None, :].expand(1, rows.shape[1], -1)).squeeze(0)
    try:
        yield torch.arange(rows.shape[1], device=positions.device)
    finally:
        rotary.cos_sin_cache = table


class VisionLanguageModel:
    """Mixed into a causal LM class (before it): the vision module under `vision_prefix`, image rows scattered into
    the embeddings, M-RoPE when the config has it. Subclasses set `vision_prefix` and `checkpoint_vision_prefixes`
    and implement `encode_images` (one [rows, hidden] tensor per image item)."""

    vision_prefix = ""
    checkpoint_vision_prefixes: tuple[str, ...] = ()
    bidirectional_images = False
    renamed_params = [("model.language_model.", "model."), ("language_model.model.", "model."),
                      ("language_model.lm_head.", "lm_head.")]

    def init_vision(self, config: Any) -> None:
        if get_parallel_state().pp_size > 1:
            raise ValueError("vision-language models run without pipeline parallelism (tensor parallelism works).")
        self.sections = mrope_sections(config)
        self.rotary: RotaryEmbedding = self.model.layers[0].self_attn.attn.rotary  # type: ignore[attr-defined]
        self.own_weight_prefixes = (self.vision_prefix,)

    def load_own_weight(self, name: str, weight: Any) -> bool:
        """A checkpoint tensor of the vision part goes to its module (True); anything else to the loader."""
        prefix = next((p for p in self.checkpoint_vision_prefixes if name.startswith(p)), None)
        if prefix is None:
            return False
        self.load_vision_weight(name[len(prefix):] if prefix.endswith(".") else name, read_whole(weight))
        return True

    def load_vision_weight(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def encode_images(self, items: list[Any]) -> list[torch.Tensor]:
        raise NotImplementedError

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings of the tokens, as its own forward makes them (images go in after)."""
        return self.model.embed_tokens(input_ids)  # type: ignore[attr-defined]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        embeds = self.embed_text(input_ids)
        images = current_mm_embeds()
        if images is not None:
            rows, values = images
            embeds = embeds.index_copy(0, rows, values.to(embeds.dtype))
        if positions.ndim == 1:
            return self.model(input_ids, positions, (embeds, None))  # type: ignore[attr-defined]
        assert self.sections is not None, "3-axis positions for a model without M-RoPE"
        with mrope_rows(self.rotary, positions, self.sections) as flat:
            return self.model(input_ids, flat, (embeds, None))  # type: ignore[attr-defined]
