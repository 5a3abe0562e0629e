"""Gemma 3 with images (issue 31), float32 on CPU against transformers, on a tiny random checkpoint
(tests/reference/gemma3_mm.py: 16 tokens per image, 16-token windows on the local layers). Prompt ids and greedy
tokens equal transformers' for one and two images, mixed with text-only requests, from text or from transformers'
expanded ids, through LLM.chat, under chunked prefill that stops before images, with async scheduling, and after a
prefix-cache hit that ends inside an image; prompt logprobs equal transformers' (whose bidirectional image attention
changes them); the scheduler's whole-image rules; the image encoder loads hub checkpoints' names."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import pytest
import torch
from transformers import AutoConfig

pytest.importorskip("PIL")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.multimodal.encoder_cache import EncoderCachePlanner  # noqa: E402
from pagedllm.multimodal.inputs import ImageItem, MultiModalState  # noqa: E402
from tests.conftest import assert_clean  # noqa: E402
from tests.reference.gemma3_mm import MM_TOKENS, load_gemma3_mm, make_tiny_gemma3_mm  # noqa: E402
from tests.reference.llava import make_test_image  # noqa: E402

ARGS = dict(dtype="float32", max_model_len=512, kv_cache_memory=16 << 20)
IMAGE = "<start_of_image>"


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_gemma3_mm(str(tmp_path_factory.mktemp("gemma3_mm") / "model"))


def turn(text: str) -> str:
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def workload() -> list[tuple[str, list[Any], int]]:
    """(prompt, images, max_tokens). Placeholders beside newlines (the template's "user\\n" before an image, a
    newline after one) and glued to words: prompt ids agree with transformers' text-level insertion of "\\n\\n"."""
    a, b, c = make_test_image(112, 84, 0), make_test_image(56, 140, 1), make_test_image(84, 84, 2)
    return [
        (turn(f"{IMAGE}Describe this."), [a], 8),
        (turn(f"{IMAGE} and{IMAGE}\nCompare them."), [b, c], 6),
        (turn("Hello there, how are you?"), [], 7),
        (turn(f"What is in the picture below, in a few words?{IMAGE} Tell me."), [c], 5),
    ]


@functools.lru_cache(maxsize=2)
def _hf(path: str, device: str = "cpu") -> tuple[Any, Any]:
    processor, model = load_gemma3_mm(path)
    return processor, model.to(device)


def hf_run(path: str, prompt: str, images: list[Any], max_tokens: int, device: str = "cpu",
           image_settings: dict[str, Any] | None = None) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """transformers' prompt ids, greedy tokens, and each prompt token's logprob with its image attention
    bidirectional (as generate runs it) and causal (token_type_ids left out); image_settings: its image processor's
    keyword arguments."""
    processor, model = _hf(path, device)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt",
                       images_kwargs=image_settings or {}).to(device)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        logprobs = [model(**{k: v for k, v in inputs.items() if k != "token_type_ids" or bidirectional}).logits[0]
                    .log_softmax(-1)[:-1].gather(1, ids[1:, None])[:, 0] for bidirectional in (True, False)]
    return ids.tolist(), out[0, len(ids):].tolist(), *(lp.cpu() for lp in logprobs)


def _generate(llm: LLM, work: Sequence[tuple[str | list[int], list[Any], int]], prompt_logprobs: bool = False,
              ) -> list[Any]:
    """work: (prompt text or token ids, images, max_tokens)."""
    prompts: list[dict[str, Any]] = []
    for prompt, images, _ in work:
        prompts.append({"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt})
        if images:
            prompts[-1]["multi_modal_data"] = {"image": images}
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, prompt_logprobs=0 if prompt_logprobs
                             else None) for _, _, m in work]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return outputs


def _prompt_logprobs(output: Any) -> torch.Tensor:
    ids = output.prompt_token_ids
    return torch.tensor([lp[t].logprob for lp, t in zip(output.prompt_logprobs[1:], ids[1:])])


def test_equals_transformers(path: str) -> None:
    """Prompt ids, greedy tokens and prompt logprobs, in one batch with a text-only request."""
    work = workload()
    expected = [hf_run(path, p, images, m) for p, images, m in work]
    outputs = _generate(LLM(path, **ARGS), work, prompt_logprobs=True)
    for output, (ids, tokens, bidirectional, causal) in zip(outputs, expected):
        assert list(output.prompt_token_ids) == ids
        assert list(output.outputs[0].token_ids) == tokens
        torch.testing.assert_close(_prompt_logprobs(output), bidirectional, atol=1e-4, rtol=0)
    # The bidirectional image attention matters here (else the check above would not see it missing).
    assert all((e[2] - e[3]).abs().max() > 1e-2 for e, (_, images, _) in zip(expected, work) if images)
    # transformers' expanded ids as the prompt: taken as they are
    (ids, tokens, _, _), (_, images, max_tokens) = expected[1], work[1]
    again = _generate(LLM(path, **ARGS), [(ids, images, max_tokens)])[0]
    assert list(again.prompt_token_ids) == ids and list(again.outputs[0].token_ids) == tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_transformers(path: str, no_tf32: None) -> None:
    """On the GPU in float32: the image's bidirectional attention through the compiled kernel's key limits gives
    transformers' (GPU) tokens and prompt logprobs, in one step per prompt and in 20-token steps that stop before
    images (piecewise graphs)."""
    work = workload()
    expected = [hf_run(path, p, images, m, "cuda") for p, images, m in work]
    for extra in ({}, {"max_num_batched_tokens": 20, "max_num_seqs": 4}):
        llm = LLM(path, **ARGS, **extra)
        assert llm.llm_engine.config.device == "cuda"
        for output, (ids, tokens, bidirectional, _) in zip(_generate(llm, work, prompt_logprobs=True), expected):
            assert list(output.outputs[0].token_ids) == tokens
            torch.testing.assert_close(_prompt_logprobs(output), bidirectional, atol=1e-3, rtol=0)
        del llm


def test_pan_and_scan(path: str) -> None:
    """Pan and scan (mm_processor_kwargs, as vLLM takes it): a wide image becomes itself and three crops, each in
    transformers' sentence and each an image of its own for the encoder and the bidirectional attention; prompt ids,
    tokens and prompt logprobs equal transformers', in one step and in 20-token steps; a square image stays one."""
    settings = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
    wide, square = make_test_image(300, 100, 0), make_test_image(84, 84, 2)
    work = [(turn(f"{IMAGE}Describe this."), [wide], 6), (turn(f"Compare{IMAGE} and {IMAGE}."), [square, wide], 5),
            (turn("Hello there, how are you?"), [], 4)]
    expected = [hf_run(path, p, images, m, image_settings=settings) for p, images, m in work]
    boi = AutoConfig.from_pretrained(path).boi_token_index
    assert expected[0][0].count(boi) == 4  # the image and three crops
    for extra in ({}, {"max_num_batched_tokens": 20, "max_num_seqs": 4}):
        llm = LLM(path, **ARGS, **extra, mm_processor_kwargs=settings)
        encoded: list[bytes] = []
        model = llm.llm_engine.runner.model
        encode = model.encode_images
        model.encode_images = lambda items: (encoded.extend(i.hash for i in items), encode(items))[1]
        for output, (ids, tokens, bidirectional, _) in zip(_generate(llm, work, prompt_logprobs=True), expected):
            assert list(output.prompt_token_ids) == ids and list(output.outputs[0].token_ids) == tokens
            torch.testing.assert_close(_prompt_logprobs(output), bidirectional, atol=1e-4, rtol=0)
        assert len(set(encoded)) == 5 == len(encoded)  # the wide image's four items (once), the square one


@pytest.mark.parametrize("mode", ["chunked", "async"])
def test_chunks_stop_before_images(path: str, mode: str) -> None:
    """The workload twice over (requests share images) in 20-token steps, where an image's 16 tokens only fit in a
    step that starts at most 4 tokens before it, or with async scheduling: transformers' tokens, each image encoded
    once, and no step cuts an image (input_batch asserts it)."""
    work = workload() * 2
    expected = [hf_run(path, p, images, m)[1] for p, images, m in work[:4]] * 2
    extra = dict(max_num_batched_tokens=20, max_num_seqs=4) if mode == "chunked" else \
        dict(async_scheduling=True, max_num_batched_tokens=48)
    llm = LLM(path, **{**ARGS, **extra})
    encoded: list[bytes] = []
    model = llm.llm_engine.runner.model
    encode = model.encode_images
    model.encode_images = lambda items: (encoded.extend(i.hash for i in items), encode(items))[1]
    assert [list(o.outputs[0].token_ids) for o in _generate(llm, work)] == expected
    assert len(encoded) == len(set(encoded)) == 3


def test_prefix_cache_hit_inside_an_image(path: str) -> None:
    """A second prompt sharing the first one's image and the text before it reuses the block that ends inside the
    image; the chunk that starts there runs to the image's end: transformers' tokens."""
    image = make_test_image(112, 84, 3)
    first, second = turn(f"Some words here{IMAGE} Alpha beta gamma."), turn(f"Some words here{IMAGE} Delta.")
    llm = LLM(path, **ARGS)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate({"prompt": first, "multi_modal_data": {"image": image}}, params, use_tqdm=False)
    out = llm.generate({"prompt": second, "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
    ids, tokens, _, _ = hf_run(path, second, [image], 6)
    start = ids.index(_hf(path)[0].tokenizer.image_token_id)
    assert start < out.num_cached_tokens < start + MM_TOKENS  # the hit ends inside the image
    assert list(out.prompt_token_ids) == ids and list(out.outputs[0].token_ids) == tokens
    assert_clean(llm.llm_engine)


def test_image_longer_than_a_step_is_refused(path: str) -> None:
    llm = LLM(path, **ARGS, max_num_batched_tokens=MM_TOKENS - 1)
    with pytest.raises(ValueError, match="one step"):
        llm.llm_engine.add_request("r", {"prompt": turn(f"{IMAGE}Hi"),
                                         "multi_modal_data": {"image": make_test_image(56, 56, 0)}})
    assert_clean(llm.llm_engine)


def test_planner_whole_images() -> None:
    """EncoderCachePlanner.fit with whole_images: a chunk stops before an image it cannot hold whole, a chunk that
    starts inside one runs to its end or nothing; without it a chunk cuts through."""
    state = MultiModalState([ImageItem(10, 16, b"a", {}), ImageItem(30, 4, b"b", {})])

    def fit(start: int, num_new: int, whole: bool = True) -> int:
        planner = EncoderCachePlanner(64, 1024, whole_images=whole)
        return planner.fit(state, start, num_new)

    assert fit(0, 20) == 10 and fit(0, 20, whole=False) == 20  # the first image does not fit: stop before it
    assert fit(0, 26) == 26 and fit(0, 31) == 30  # the first whole, the second cut: stop before the second
    assert fit(16, 5) == 0 and fit(16, 10) == 10  # from inside the first: to its end or nothing
    assert fit(10, 16) == 16 and fit(26, 4) == 4  # exactly the image; text only


def test_llm_chat_with_image_url(path: str) -> None:
    """LLM.chat renders the image part as `<start_of_image>` right after "user\\n" (the chat template's way):
    transformers' prompt ids and tokens."""
    import base64
    import io

    image = make_test_image(84, 112, 4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
    llm = LLM(path, **ARGS)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    ids, tokens, _, _ = hf_run(path, turn(f"{IMAGE}What is this?"), [image], 6)
    assert list(out.prompt_token_ids) == ids and list(out.outputs[0].token_ids) == tokens


def test_image_encoder_takes_hub_names(path: str) -> None:
    """The tower under `vision_tower.vision_model.` (hub checkpoints) loads as well as transformers 5's layout, and
    the encoder's rows are transformers' image features."""
    from transformers import AutoConfig

    from pagedllm.models.gemma3_mm import Gemma3ImageEncoder

    processor, model = _hf(path)
    encoder = Gemma3ImageEncoder(AutoConfig.from_pretrained(path))
    hub = {name.replace("model.vision_tower.", "vision_tower.vision_model.").removeprefix("model."): tensor
           for name, tensor in model.state_dict().items() if not name.startswith(("model.language_model", "lm_head"))}
    assert encoder.load_weights(hub.items()) == {name for name, _ in encoder.named_parameters()}
    pixels = processor.image_processor(images=[make_test_image(70, 90, 5)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), model.model.get_image_features(pixels).pooler_output)


def test_tensor_parallel_equals_one_process(path: str) -> None:
    """TP=2 with 20-token steps: the decoder sharded, the SigLIP tower and projector on every rank, the key limits sent
    with each step; the tokens of one process."""
    work = workload()
    one = [list(o.outputs[0].token_ids) for o in _generate(LLM(path, **ARGS), work)]
    llm = LLM(path, **ARGS, tensor_parallel_size=2, max_num_batched_tokens=20)
    assert [list(o.outputs[0].token_ids) for o in _generate(llm, work)] == one
    del llm  # its workers stop with it: one parallel world per process at a time
