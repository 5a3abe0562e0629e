"""`pagedllm bench mm`: offline throughput of a vision-language model on requests that each show one image.

Each request: the image (random pixels, its own per request, --image-size square) then --input-len random text
tokens, --output-len generated tokens (EOS ignored). `--model qwen2.5-vl-7b` writes that shape's config with a
tokenizer (the bundled SmolLM2's plus Qwen's vision tokens) and Qwen2-VL's image processor, and runs random weights.
Besides requests/s and tokens/s it reports the vision encoder's time per image (alone and in a batch of 16) and the
share of the run that encoding all the images takes. `build_requests` is the one request builder: vLLM's side of the
comparison (run beside it) uses it too."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

from pagedllm.benchmarks import environment, synchronize, write_json

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", tie_word_embeddings=False,
        text_config=dict(model_type="qwen2_5_vl_text", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                         max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(model_type="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu",
                           tokens_per_second=2),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--num-prompts", type=int, default=500)
    group.add_argument("--image-size", type=int, default=448, help="square images of this many pixels a side")
    group.add_argument("--input-len", type=int, default=64, help="text tokens per prompt, besides the image")
    group.add_argument("--output-len", type=int, default=128)
    group.add_argument("--output-json", default=None, metavar="PATH")


def write_shape(shape: str, path: str) -> str:
    """A model directory of `shape`: config.json, tokenizer, image processor, chat template (no weights)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from pagedllm.models.gguf import resolve_model

    os.makedirs(path, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    config = dict(SHAPES[shape], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(path)
    return path


def build_requests(path: str, num: int, image_size: int, input_len: int, seed: int = 0) -> list[tuple[list[int], Any]]:
    """(prompt token ids with one image placeholder, image) per request: each image its own random pixels."""
    import numpy as np
    from PIL import Image

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    pad = config.get("image_token_id", config.get("image_token_index"))
    # Qwen2-VL frames its placeholder with vision start / end tokens; LLaVA's stands alone.
    image = [config["vision_start_token_id"], pad, config["vision_end_token_id"]] if "vision_start_token_id" in config \
        else [pad]
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    base = pixels.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    requests = []
    for i in range(num):
        pixels_of_request = base.copy()
        pixels_of_request[i % image_size] = pixels.integers(0, 256, size=(image_size, 3), dtype=np.uint8)  # distinct
        text = [rng.randint(100, 49000) for _ in range(input_len)]
        requests.append(([*image, *text], Image.fromarray(pixels_of_request, mode="RGB")))
    return requests


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm import LLM, SamplingParams
    from pagedllm.entrypoints.cli import engine_kwargs

    kwargs = {k: v for k, v in engine_kwargs(args).items() if v is not None}
    if kwargs.get("model") in SHAPES:
        path = write_shape(kwargs["model"], os.path.join(tempfile.gettempdir(), "pagedllm-shapes", kwargs["model"]))
        kwargs.update(model=path, load_format="dummy")
    kwargs.setdefault("max_model_len", 4096)
    requests = build_requests(kwargs["model"], args.num_prompts, args.image_size, args.input_len, args.seed)
    llm = LLM(**kwargs)
    config = llm.llm_engine.config
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}} for ids, image in requests]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up (these images stay cached: the run uses others)
    steps = _count_steps(llm)
    synchronize(config.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts[4:], params, use_tqdm=False)
    synchronize(config.device)
    seconds = time.perf_counter() - start
    num_steps, encoding_steps, encoded = steps()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    encoder = _encoder_times(llm, [image for _, image in requests[:16]])
    images = len(outputs)
    figures = {
        "requests": images, "seconds": seconds, "requests_per_s": images / seconds,
        "output_tokens_per_s": output_tokens / seconds, "total_tokens_per_s": (prompt_tokens + output_tokens) / seconds,
        "image_tokens": (prompt_tokens - sum(len(ids) - 1 for ids, _ in requests[4:])) / images, **encoder,
        "encoder_share_of_run": encoder["encoder_s_per_image_batched"] * images / seconds,
        "steps": num_steps, "encoding_steps": encoding_steps, "mean_step_s": seconds / max(num_steps, 1),
    }
    # A step that encodes: its images' encoder time (at the batched rate) against a mean step of the run.
    per_step = encoder["encoder_s_per_image_batched"] * encoded / max(encoding_steps, 1)
    figures["encoder_share_of_encoding_step"] = per_step / (per_step + figures["mean_step_s"])
    print(f"pagedllm: {images} requests in {seconds:.2f} s: {figures['requests_per_s']:.2f} req/s, "
          f"{figures['output_tokens_per_s']:.0f} output tok/s, {figures['total_tokens_per_s']:.0f} total tok/s "
          f"({figures['image_tokens']:.0f} tokens per image)")
    print(f"vision encoder: {1e3 * encoder['encoder_s_per_image']:.2f} ms per image alone, "
          f"{1e3 * encoder['encoder_s_per_image_batched']:.2f} ms each in a batch of 16: "
          f"{100 * figures['encoder_share_of_run']:.1f} % of the run; it ran in {encoding_steps} of {num_steps} steps, "
          f"{encoded / max(encoding_steps, 1):.1f} images each: ~{1e3 * per_step:.1f} ms beside a mean "
          f"{1e3 * figures['mean_step_s']:.1f} ms step ({100 * figures['encoder_share_of_encoding_step']:.0f} %)")
    payload = {"benchmark": "mm", "results": {"pagedllm": figures},
               "environment": environment(config.device, config.dtype) | {"model": config.model_path}}
    if args.output_json:
        write_json(args.output_json, args, payload)
    return payload


def _count_steps(llm: Any) -> Any:
    """Counts the engine's steps, those that run the vision encoder, and the images encoded, from now on; the
    returned function gives (steps, encoding steps, images)."""
    engine, model = llm.llm_engine, llm.llm_engine.runner.model
    counts = [0, 0, 0]
    step, encode = engine.step, model.encode_images

    def counted_step() -> Any:
        counts[0] += 1
        return step()

    def counted_encode(items: list[Any]) -> Any:
        counts[1] += 1
        counts[2] += len(items)
        return encode(items)

    engine.step, model.encode_images = counted_step, counted_encode
    return lambda: tuple(counts)


def _encoder_times(llm: Any, images: list[Any]) -> dict[str, float]:
    """The vision encoder alone on processed images: seconds per image one at a time and in one batch (medians)."""
    from pagedllm.multimodal.inputs import ImageItem
    from pagedllm.multimodal.processor import content_hash, processor_for

    engine = llm.llm_engine
    processor, model, device = processor_for(engine.config), engine.runner.model, engine.config.device
    assert processor is not None, "bench mm needs a vision-language model"
    items = []
    for image in images:
        items.extend(ImageItem(0, rows, content_hash(data), data) for data, rows in processor.image_items(image))

    def timed(batch: list[Any]) -> float:
        runs = []
        for _ in range(5):
            synchronize(device)
            start = time.perf_counter()
            model.encode_images(batch)
            synchronize(device)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    import torch

    with torch.inference_mode():
        return {"encoder_s_per_image": timed(items[:1]), "encoder_s_per_image_batched": timed(items) / len(items)}
