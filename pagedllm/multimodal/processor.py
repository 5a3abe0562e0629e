"""Turns a prompt's token ids and images into what the engine runs: the image processor's tensors per image (through
transformers' own image processors, so pixels match the reference), each image's single placeholder token replaced by
its token sequence (the image's rows of placeholder tokens, which a model may wrap in other tokens: Gemma 3), and for
Qwen2-VL the M-RoPE positions.

A prompt holds one placeholder per image (a chat template's `<|image_pad|>`, `<image>` or `<start_of_image>`), or the
images already expanded (ids that transformers' processor made); any other count is an error naming both numbers."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pagedllm.multimodal.inputs import ImageItem, MultiModalState


def content_hash(data: dict[str, torch.Tensor]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(data):
        tensor = data[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


class MultiModalProcessor:
    """The model-independent part: placeholder expansion and item bookkeeping; subclasses process one image.
    `placeholder`: the token a prompt holds per image; `image_token`: the token of each embedding row (the same but
    for models that wrap the rows, see `replacement`)."""

    _MAX_VARIANTS = 32  # image processors kept for requests' own settings (least recently used dropped)

    def __init__(self, hf_config: Any, model_path: str, settings: dict[str, Any] | None = None) -> None:
        self.hf_config, self.model_path, self.settings = hf_config, model_path, dict(settings or {})
        self._variants: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # a server front processes images on several threads
        self.image_processor = self.image_processor_for(None)
        token = getattr(hf_config, "image_token_id", None)
        self.placeholder: int = token if token is not None else hf_config.image_token_index
        self.image_token: int = self.placeholder

    def image_processor_for(self, options: dict[str, Any] | None) -> Any:
        """transformers' image processor of the checkpoint with the engine's settings (mm_processor_kwargs) and then
        a request's over them; an unknown setting is a ValueError naming the ones it takes."""
        from transformers import AutoImageProcessor

        merged = {**self.settings, **(options or {})}
        key = json.dumps(merged, sort_keys=True, default=str)
        with self._lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
        processor = AutoImageProcessor.from_pretrained(self.model_path, **merged)
        valid = set(getattr(getattr(processor, "valid_kwargs", None), "__annotations__", {}))
        unknown = sorted(k for k in merged if k not in valid and not hasattr(processor, k))
        if unknown:
            raise ValueError(f"mm_processor_kwargs: {type(processor).__name__} takes no {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(valid)) or 'nothing'}.")
        with self._lock:
            self._variants[key] = processor
            while len(self._variants) > self._MAX_VARIANTS:
                self._variants.popitem(last=False)
        return processor

    def image_inputs(self, image: Any, image_processor: Any = None) -> tuple[dict[str, torch.Tensor], int]:
        """The encoder's inputs for one image (through `image_processor`, default the engine's) and how many
        placeholder tokens (embedding rows) it takes."""
        raise NotImplementedError

    def image_items(self, image: Any, image_processor: Any = None) -> list[tuple[dict[str, torch.Tensor], int]]:
        """What the encoder runs for one image, each with its rows: the image alone (Gemma 3's pan and scan adds
        crops of it)."""
        return [self.image_inputs(image, image_processor)]

    def replacement(self, counts: list[int]) -> tuple[list[int], list[int]]:
        """The tokens that take the place of one image's placeholder (its items' rows of `counts`), and the index of
        each item's first row among them."""
        assert len(counts) == 1, "one item per image"
        return [self.image_token] * counts[0], [0]

    def join(self, out: list[int], ids: list[int], replacement: bool = False) -> None:
        """Appends ids to out: prompt text and replacements (`replacement`) in turn (a model may merge tokens at the
        seams)."""
        out.extend(ids)

    def process(self, token_ids: list[int], images: list[Any],
                options: dict[str, Any] | None = None) -> tuple[list[int], MultiModalState]:
        """options: the request's image processor settings (mm_processor_kwargs), over the engine's."""
        image_processor = self.image_processor_for(options) if options else self.image_processor
        per_image = [self.image_items(image, image_processor) for image in images]
        inputs = [item for items in per_image for item in items]
        counts = [n for _, n in inputs]
        ids = np.asarray(token_ids)
        where = np.flatnonzero(ids == self.placeholder)
        rows = where if self.image_token == self.placeholder else np.flatnonzero(ids == self.image_token)
        # Already expanded: every image's rows are there (checked first where the placeholder is another token).
        expanded = len(rows) == sum(counts) > 0 and (self.image_token != self.placeholder or len(where) != len(images))
        if expanded:
            starts = np.cumsum([0] + counts[:-1])
            offsets, out = [int(rows[k]) for k in starts], list(token_ids)
        elif len(where) == len(images):  # one placeholder each: replace
            out, offsets, previous = [], [], 0
            for at, items in zip(where.tolist(), per_image):
                self.join(out, token_ids[previous:at])
                seq, firsts = self.replacement([n for _, n in items])
                self.join(out, seq, replacement=True)
                # From the end: a merge at the seam before moves them.
                offsets.extend(len(out) - len(seq) + first for first in firsts)
                previous = at + 1
            self.join(out, token_ids[previous:])
        else:
            raise ValueError(f"multi_modal_data: the prompt holds {len(where)} image placeholder tokens (id "
                             f"{self.placeholder}) for {len(images)} image(s); it needs one per image (as the chat "
                             f"template writes them) or the expanded {sum(counts)}.")
        items = [ImageItem(at, n, content_hash(data), data) for at, (data, n) in zip(offsets, inputs)]
        return out, self.finish(out, MultiModalState(items))

    def finish(self, token_ids: list[int], state: MultiModalState) -> MultiModalState:
        return state


class Qwen2VLProcessor(MultiModalProcessor):
    def image_inputs(self, image: Any, image_processor: Any = None) -> tuple[dict[str, torch.Tensor], int]:
        from pagedllm.models.qwen2_vl_vision import image_token_count

        out = (image_processor or self.image_processor)(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]
        count = image_token_count(tuple(grid[0].tolist()), self.hf_config.vision_config.spatial_merge_size)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, count

    def finish(self, token_ids: list[int], state: MultiModalState) -> MultiModalState:
        from pagedllm.models.qwen2_vl_vision import mrope_positions

        hf = self.hf_config
        grids = [tuple(item.data["image_grid_thw"][0].tolist()) for item in state.items]
        state.mrope_positions, state.mrope_delta = mrope_positions(
            token_ids, grids, self.placeholder, hf.vision_start_token_id, hf.vision_config.spatial_merge_size)
        return state


class LlavaProcessor(MultiModalProcessor):
    def image_inputs(self, image: Any, image_processor: Any = None) -> tuple[dict[str, torch.Tensor], int]:
        from pagedllm.models.llava_vision import llava_image_token_count

        out = (image_processor or self.image_processor)(images=[image], return_tensors="pt")
        data = {"pixel_values": out["pixel_values"]}
        if "image_sizes" in out:
            data["image_sizes"] = torch.as_tensor(out["image_sizes"])
        width, height = image.size
        return data, llava_image_token_count(self.hf_config, (height, width))


class Gemma3Processor(MultiModalProcessor):
    """Gemma 3: each `<start_of_image>` of the prompt becomes "\n\n", itself, mm_tokens_per_image image tokens,
    `<end_of_image>`, "\n\n", as transformers' processor writes it into the text; with pan and scan
    (do_pan_and_scan, for images far from square) the image and its crops each take such a sequence, in transformers'
    sentence ("Here is the original image ... and here are some crops to help you see better ..."), and each is an
    item of its own for the encoder and the bidirectional attention. Inserted here as tokens, where the
    text would have tokenized across the seam: a whitespace run there (the template's "user\n<start_of_image>" takes
    one "\n\n\n") is encoded again with the token after it (join). A tokenizer that merges other text with
    newlines (punctuation with the newlines after it, as some pre-tokenizers do) may still give other ids than
    transformers' text; the tests' SmolLM2 tokenizer and prompts agree with it."""

    def __init__(self, hf_config: Any, model_path: str, settings: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer

        super().__init__(hf_config, model_path, settings)
        self.placeholder, self.image_token = hf_config.boi_token_index, hf_config.image_token_index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._blank: dict[int, bool] = {}
        # transformers' Gemma3Processor fills the settings a checkpoint leaves null (pan and scan's) with its own.
        self._defaults = _gemma3_image_defaults()

    def image_items(self, image: Any, image_processor: Any = None) -> list[tuple[dict[str, torch.Tensor], int]]:
        image_processor = image_processor or self.image_processor
        unset = {k: v for k, v in self._defaults.items() if getattr(image_processor, k, None) is None}
        pixels = image_processor(images=[image], return_tensors="pt", **unset)["pixel_values"]
        return [({"pixel_values": pixels[i : i + 1]}, self.hf_config.mm_tokens_per_image) for i in range(len(pixels))]

    def replacement(self, counts: list[int]) -> tuple[list[int], list[int]]:
        hf = self.hf_config
        boi, image, eoi = self.tokenizer.convert_ids_to_tokens([hf.boi_token_index, self.image_token,
                                                                 hf.eoi_token_index])
        full = [f"\n\n{boi}{image * n}{eoi}\n\n" for n in counts]
        text = full[0] if len(counts) == 1 else (f"Here is the original image {full[0]} and here are some crops to "
                                                   f"help you see better " + " ".join(full[1:]))
        seq = self.tokenizer.encode(text, add_special_tokens=False)  # special tokens split it as transformers' does
        return seq, [i + 1 for i, token in enumerate(seq) if token == hf.boi_token_index]

    def join(self, out: list[int], ids: list[int], replacement: bool = False) -> None:
        """A whitespace run at the seam (out's last blank tokens, ids' first ones) is encoded again as text, with the
        token after it, which a tokenizer may split the run for ("\n\nWord" -> "\n", "\n", "Word"); that token must
        come out unchanged, else the run is encoded alone. A replacement's own text before its first image token
        ("\n\n", or pan and scan's sentence) is encoded again whole with the run before it."""
        i, j = len(out), 0
        while i > 0 and self._is_blank(out[i - 1]):
            i -= 1
        if replacement:
            hf = self.hf_config
            k = next((n for n, t in enumerate(ids) if t in (hf.boi_token_index, self.image_token)), len(ids))
            out[i:] = self._encode(out[i:] + ids[:k])
            out.extend(ids[k:])
            return
        if i == len(out) or not ids:
            out.extend(ids)
            return
        while j < len(ids) and self._is_blank(ids[j]):
            j += 1
        run = out[i:] + ids[:j]
        merged = self._encode(run + ids[j : j + 1])
        if j == len(ids) or merged[-1:] != ids[j : j + 1]:
            merged = self._encode(run) + ids[j : j + 1]
        out[i:] = merged
        out.extend(ids[j + 1 :])

    def _encode(self, ids: list[int]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False),
                                     add_special_tokens=False)

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            text = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
            self._blank[token] = bool(text) and text.isspace()
        return self._blank[token]


def _gemma3_image_defaults() -> dict[str, Any]:
    import transformers.models.gemma3.processing_gemma3 as gemma3

    defaults = getattr(gemma3.Gemma3Processor, "images_kwargs", None)  # transformers 5.2x
    if defaults is None:  # earlier: the processor's kwargs class holds them
        defaults = getattr(gemma3, "Gemma3ProcessorKwargs")._defaults.get("images_kwargs", {})
    return dict(defaults)


def prepare_prompt(config: Any, prompt: Any, token_ids: list[int]) -> tuple[list[int], MultiModalState | None]:
    """A prompt's token ids with its images' placeholders expanded, and its images' state (None: no images): from
    `multi_modal_data` ({"image": an image or a list}) or, when a front already did this, from `mm_inputs`. Raises
    ValueError for a text-only model, too many images, an image the encoder cache can never hold or (Gemma 3) that
    one step can never compute whole."""
    if not isinstance(prompt, dict):
        return token_ids, None
    data = prompt.get("multi_modal_data")
    if not data:
        return token_ids, prompt.get("mm_inputs")
    from pagedllm.multimodal.encoder_cache import encoder_cache_rows
    from pagedllm.multimodal.policy import check_mm_limits, check_takes_media, parse_processor_kwargs

    check_takes_media(config.hf_config, data if isinstance(data, dict) else ["multimodal"])
    unknown = sorted(set(data) - {"image"})
    if unknown:
        raise ValueError(f"multi_modal_data: only images are taken (key 'image'); got {unknown}.")
    images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
    check_mm_limits({"image": len(images)}, config.limit_mm_per_prompt)
    processor = processor_for(config)
    assert processor is not None, "a vision config without a known vision-language architecture"
    options = parse_processor_kwargs(prompt.get("mm_processor_kwargs"))
    token_ids, state = processor.process(token_ids, list(images), options)
    too_big = [item.length for item in state.items if item.length > encoder_cache_rows(config)]
    if too_big:
        raise ValueError(f"multi_modal_data: an image takes {too_big[0]} tokens, more than the encoder cache holds "
                         f"({encoder_cache_rows(config)}): use smaller images or raise max_num_batched_tokens.")
    if whole_images(config.hf_config):
        too_long = [item.length for item in state.items if item.length > config.max_num_batched_tokens]
        if too_long:
            raise ValueError(f"multi_modal_data: an image takes {too_long[0]} tokens, and this model computes an "
                             f"image's tokens in one step (they attend to each other): raise max_num_batched_tokens "
                             f"({config.max_num_batched_tokens}) to at least that.")
    return token_ids, state


def whole_images(hf_config: Any) -> bool:
    """Whether the model's image tokens attend to each other both ways (Gemma 3), so that an image's tokens must be
    computed in one step."""
    from pagedllm.models.registry import get_model_class

    return bool(getattr(get_model_class(hf_config), "bidirectional_images", False))


_processors: dict[str, MultiModalProcessor | None] = {}


def processor_for(config: Any) -> MultiModalProcessor | None:
    """The model's image processing, built once per process and settings (the engine's and a server front's)."""
    settings = getattr(config, "mm_processor_kwargs", None)
    key = f"{config.model_path}|{json.dumps(settings, sort_keys=True, default=str)}"
    if key not in _processors:
        _processors[key] = make_processor(config.hf_config, config.model_path, settings)
    return _processors[key]


PROCESSORS: dict[str, type[MultiModalProcessor]] = {
    "Qwen2VLForConditionalGeneration": Qwen2VLProcessor,
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLProcessor,
    "LlavaForConditionalGeneration": LlavaProcessor,
    "LlavaNextForConditionalGeneration": LlavaProcessor,
    "Gemma3ForConditionalGeneration": Gemma3Processor,
}


def make_processor(hf_config: Any, model_path: str,
                   settings: dict[str, Any] | None = None) -> MultiModalProcessor | None:
    """The image processing of a vision-language model (settings: mm_processor_kwargs); None for a text-only one."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in PROCESSORS:
            return PROCESSORS[arch](hf_config, model_path, settings)
    return None
