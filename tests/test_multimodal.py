"""Vision-language models (issue 31), float32 on CPU against transformers: tiny random Qwen2-VL, Qwen2.5-VL, LLaVA-1.5
and LLaVA-NeXT checkpoints with real image processors. Greedy tokens equal transformers' for one and several images
per prompt, in mixed batches with text-only requests, with chunked prefill cutting through image tokens, with
preemption and async scheduling; each image is encoded once across chunks, preemption and repeats (the encoder
cache); the prefix cache never shares blocks between the same text under different images; bad inputs are refused."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
import torch

pytest.importorskip("PIL")

from pagedllm import LLM, SamplingParams  # noqa: E402
from tests.conftest import assert_clean  # noqa: E402
from tests.reference.llava import make_tiny_llava  # noqa: E402
from tests.reference.qwen2_vl import load_processor, make_test_image, make_tiny_qwen2_vl  # noqa: E402

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MODELS = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")
ARGS = dict(dtype="float32", max_model_len=1024, kv_cache_memory=16 << 20)


@pytest.fixture(scope="session")
def vl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vl")
    return {
        "qwen2_vl": make_tiny_qwen2_vl(str(root / "qwen2_vl"), "qwen2_vl"),
        "qwen2_5_vl": make_tiny_qwen2_vl(str(root / "qwen2_5_vl"), "qwen2_5_vl"),
        "llava": make_tiny_llava(str(root / "llava")),
        "llava_next": make_tiny_llava(str(root / "llava_next"), next=True),
    }


def chat_prompt(kind: str, text: str, num_images: int = 0) -> str:
    """A user turn with `num_images` images first, or wherever `text` writes {image}."""
    image = QWEN_IMAGE if kind.startswith("qwen") else "<image>"
    text = image * num_images + text.replace("{image}", image)
    if kind.startswith("qwen"):
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return f"USER: {text} ASSISTANT:"


@functools.lru_cache(maxsize=4)
def _hf(path: str, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = load_processor(path) if "qwen" in path else AutoProcessor.from_pretrained(path)
    return processor, AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device).eval()


def hf_greedy(path: str, prompt: str, images: list[Any], max_tokens: int, device: str = "cpu",
              image_settings: dict[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """transformers' prompt ids (placeholders expanded by its processor, with `image_settings` over the
    checkpoint's image processor config) and greedy tokens."""
    processor, model = _hf(path, device)
    if image_settings:
        from transformers import AutoImageProcessor

        processor = copy.copy(processor)
        processor.image_processor = AutoImageProcessor.from_pretrained(path, **image_settings)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def _workload(kind: str) -> list[tuple[str, list[Any], int]]:
    """(prompt, images, max_tokens): one image, two of different sizes, text only, an image in mid-prompt."""
    a, b, c = make_test_image(112, 84, 0), make_test_image(56, 140, 1), make_test_image(84, 84, 2)
    return [
        (chat_prompt(kind, "Describe this.", 1), [a], 8),
        (chat_prompt(kind, "Compare them.", 2), [b, c], 6),
        (chat_prompt(kind, "Hello there, how are you?", 0), [], 7),
        (chat_prompt(kind, "What is in the picture below? {image} Tell me."), [c], 5),
    ]


def _generate(llm: LLM, workload: list[tuple[str, list[Any], int]]) -> list[Any]:
    prompts = [{"prompt": p, "multi_modal_data": {"image": images}} if images else p for p, images, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, _, m in workload]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return outputs


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_equals_transformers(vl_models: dict[str, str], kind: str) -> None:
    path = vl_models[kind]
    workload = _workload(kind)
    expected = [hf_greedy(path, p, images, m) for p, images, m in workload]
    llm = LLM(path, **ARGS)
    for output, (ids, tokens) in zip(_generate(llm, workload), expected):
        assert list(output.prompt_token_ids) == ids
        assert list(output.outputs[0].token_ids) == tokens


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_next"])
@pytest.mark.parametrize("mode", ["chunked", "preempt", "async"])
def test_mixed_batches_chunks_and_preemption(vl_models: dict[str, str], kind: str, mode: str) -> None:
    """A mixed batch (repeated three times over, so requests share images) under 24-token steps that cut through
    the image tokens, a KV pool small enough to preempt, or async scheduling: the tokens of one request alone, and
    every image encoded once."""
    path = vl_models[kind]
    workload = _workload(kind) * 3
    expected = [list(o.outputs[0].token_ids) for o in _generate(LLM(path, **ARGS), workload[:4])] * 3
    extra: dict[str, Any] = {
        "chunked": dict(max_num_batched_tokens=24, max_num_seqs=4),
        "preempt": dict(kv_cache_memory=None, num_gpu_blocks_override=14, max_num_batched_tokens=64, max_num_seqs=8,
                        enable_prefix_caching=False),
        "async": dict(async_scheduling=True, max_num_batched_tokens=48),
    }[mode]
    llm = LLM(path, **{**ARGS, **extra})
    runner = llm.llm_engine.runner
    encoded: list[bytes] = []
    encode = runner.model.encode_images
    runner.model.encode_images = lambda items: (encoded.extend(i.hash for i in items), encode(items))[1]
    got = [list(o.outputs[0].token_ids) for o in _generate(llm, workload)]
    assert got == expected
    if mode == "preempt":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    else:
        assert len(encoded) == len(set(encoded)) == 3  # three distinct images, each encoded once
        # vLLM's mm_cache series (offline here, as on /metrics): every lookup that missed encoded its image; the
        # mid-prompt image repeats one seen before (a hit), and prefix-cache hits past an image skip its lookup
        metrics = {m.name: m for m in llm.get_metrics()}
        queries, hits = metrics["pagedllm:mm_cache_queries"].value, metrics["pagedllm:mm_cache_hits"].value
        assert queries - hits == 3 and hits >= 1


def test_prefix_cache_keys_include_the_image(vl_models: dict[str, str]) -> None:
    """The same text with another image shares no block past the image; the same image shares the prompt's full
    blocks; both answers are transformers'."""
    path = vl_models["qwen2_vl"]
    prompt = chat_prompt("qwen2_vl", "Here is a long opening sentence, which fills a whole block or more. {image} Tell.")
    a, b = make_test_image(112, 84, 0), make_test_image(112, 84, 5)
    llm = LLM(path, **ARGS)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params, use_tqdm=False)[0]
    other = llm.generate({"prompt": prompt, "multi_modal_data": {"image": b}}, params, use_tqdm=False)[0]
    same = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params, use_tqdm=False)[0]
    block = llm.llm_engine.config.block_size
    pad = load_processor(path).tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_start = list(first.prompt_token_ids).index(pad)
    assert image_start >= block and other.num_cached_tokens == image_start // block * block  # the blocks before it
    assert same.num_cached_tokens == (len(same.prompt_token_ids) - 1) // block * block
    assert list(other.outputs[0].token_ids) == hf_greedy(path, prompt, [b], 6)[1]
    assert list(same.outputs[0].token_ids) == list(first.outputs[0].token_ids) == hf_greedy(path, prompt, [a], 6)[1]


def test_llm_chat_with_image_url(vl_models: dict[str, str]) -> None:
    """LLM.chat takes OpenAI image_url parts (a data URL here) and vLLM's image_pil parts, and gives transformers'
    tokens."""
    import base64
    import io

    path = vl_models["qwen2_vl"]
    image = make_test_image(84, 112, 3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    llm = LLM(path, **ARGS)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    ids, tokens = hf_greedy(path, chat_prompt("qwen2_vl", "What is this?", 1), [image], 6)
    assert list(out.prompt_token_ids) == ids and list(out.outputs[0].token_ids) == tokens
    # vLLM's offline image_pil parts, beside a URL, in their order
    other = make_test_image(56, 140, 1)
    both = [{"role": "user", "content": [{"type": "image_pil", "image_pil": other}, messages[0]["content"][0],
                                         {"type": "text", "text": "Compare them."}]}]
    out = llm.chat(both, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    ids, tokens = hf_greedy(path, chat_prompt("qwen2_vl", "Compare them.", 2), [other, image], 6)
    assert list(out.prompt_token_ids) == ids and list(out.outputs[0].token_ids) == tokens
    with pytest.raises(ValueError, match="image_pil part needs"):
        llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": "x.png"}]}], use_tqdm=False)


def test_mm_processor_kwargs(vl_models: dict[str, str]) -> None:
    """Image processor settings for the engine (mm_processor_kwargs) and per request (the prompt's, LLM.chat's):
    Qwen2-VL's max_pixels gives fewer image tokens, and prompt ids and tokens stay transformers' under the same
    settings; unknown settings are refused, at start or with the request, and the engine keeps serving."""
    path = vl_models["qwen2_5_vl"]
    image = make_test_image(224, 168, 4)
    prompt = chat_prompt("qwen2_5_vl", "Describe this.", 1)
    small = {"max_pixels": 112 * 112}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    default_ids, _ = hf_greedy(path, prompt, [image], 5)
    ids, tokens = hf_greedy(path, prompt, [image], 5, image_settings=small)
    assert len(ids) < len(default_ids)
    engine_wide = LLM(path, **ARGS, mm_processor_kwargs=json.dumps(small))
    out = engine_wide.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ids and list(out.outputs[0].token_ids) == tokens
    llm = LLM(path, **ARGS)
    request = {"prompt": prompt, "multi_modal_data": {"image": image}, "mm_processor_kwargs": small}
    plain, own = llm.generate([{**request, "mm_processor_kwargs": None}, request], params, use_tqdm=False)
    assert list(plain.prompt_token_ids) == default_ids
    assert list(own.prompt_token_ids) == ids and list(own.outputs[0].token_ids) == tokens
    with pytest.raises(ValueError, match="takes no max_pixel"):
        llm.llm_engine.add_request("bad", {**request, "mm_processor_kwargs": {"max_pixel": 5}})
    with pytest.raises(ValueError, match="must be JSON"):
        LLM(path, **ARGS, mm_processor_kwargs="{max_pixels")
    with pytest.raises(ValueError, match="takes no max_pixel"):
        LLM(path, **ARGS, mm_processor_kwargs={"max_pixel": 5})
    assert_clean(llm.llm_engine)
    assert list(llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids) == tokens


def test_lora_adapter_on_the_decoder(vl_models: dict[str, str], tmp_path: Any) -> None:
    """A PEFT adapter made on transformers' Qwen2-VL (its decoder's seven projections, which PEFT names under
    model.language_model) serves as on a text model: with an image, transformers + peft's tokens, beside a request on
    the base model in the same batch."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from pagedllm.lora.request import LoRARequest

    path, adapter = vl_models["qwen2_vl"], str(tmp_path / "adapter")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(adapter)
    image, prompt = make_test_image(112, 84, 0), chat_prompt("qwen2_vl", "Describe this.", 1)
    processor, _ = _hf(path)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        tuned = peft_model.eval().generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = [tuned[0, inputs["input_ids"].shape[1]:].tolist(), hf_greedy(path, prompt, [image], 6)[1]]
    assert expected[0] != expected[1]  # the adapter changes the answer
    llm = LLM(path, **ARGS, enable_lora=True, max_lora_rank=8)
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    outputs = llm.generate([request, request], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           use_tqdm=False, lora_request=[LoRARequest("tuned", 1, adapter), None])
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_bad_inputs(vl_models: dict[str, str], tiny_models: dict[str, str]) -> None:
    path = vl_models["qwen2_vl"]
    image = make_test_image(56, 56, 0)
    llm = LLM(path, **ARGS, limit_mm_per_prompt={"image": 2})
    engine = llm.llm_engine
    cases = [
        ({"prompt": chat_prompt("qwen2_vl", "two?", 2), "multi_modal_data": {"image": [image]}}, "placeholder"),
        ({"prompt": chat_prompt("qwen2_vl", "none", 0), "multi_modal_data": {"image": [image]}}, "placeholder"),
        ({"prompt": chat_prompt("qwen2_vl", "three", 3), "multi_modal_data": {"image": [image] * 3}}, "at most 2"),
        ({"prompt": chat_prompt("qwen2_vl", "audio", 1), "multi_modal_data": {"audio": [b"x"]}}, "only images"),
    ]
    for i, (prompt, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            engine.add_request(f"bad-{i}", prompt)
    assert_clean(engine)
    text_only = LLM(tiny_models["llama"], skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="text-only"):
        text_only.llm_engine.add_request("t", {"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": [image]}})
    # The engine still serves.
    out = llm.generate({"prompt": chat_prompt("qwen2_vl", "ok", 1), "multi_modal_data": {"image": image}},
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_server_chat_with_images(vl_models: dict[str, str], tmp_path: Any) -> None:
    """`pagedllm serve` on the tiny Qwen2-VL, through the official openai client: a data URL and a local file (under
    --allowed-local-media-path) give transformers' tokens; a bad image and too many images are 400s, and the
    server keeps serving."""
    import base64
    import io

    import httpx
    import openai

    from tests.server_utils import ServerProcess

    path = vl_models["qwen2_vl"]
    a, b = make_test_image(112, 84, 0), make_test_image(56, 140, 1)
    buffer = io.BytesIO()
    a.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    b.save(tmp_path / "b.png")
    server = ServerProcess([path, "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", str(64 << 20),
                            "--limit-mm-per-prompt", '{"image": 2}', "--allowed-local-media-path", str(tmp_path)])
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")

        def ask(*urls: str) -> Any:
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Hi?"}]
            return client.chat.completions.create(model=path, messages=[{"role": "user", "content": parts}],
                                                  max_tokens=5, temperature=0, logprobs=True,
                                                  extra_body={"ignore_eos": True})

        small = {"max_pixels": 56 * 56}
        answer = client.chat.completions.create(
            model=path, max_tokens=2, extra_body={"mm_processor_kwargs": small},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                   {"type": "text", "text": "Hi?"}]}])
        assert answer.usage.prompt_tokens == len(hf_greedy(path, chat_prompt("qwen2_vl", "Hi?", 1), [a], 1,
                                                           image_settings=small)[0])
        with pytest.raises(openai.BadRequestError, match="takes no max_pixel"):
            client.chat.completions.create(
                model=path, max_tokens=2, extra_body={"mm_processor_kwargs": {"max_pixel": 1}},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}])
        # /tokenize of the same messages: the engine's prompt, the images' tokens included
        parts = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Hi?"}]
        counted = httpx.post(server.url("/tokenize"), json={"messages": [{"role": "user", "content": parts}]}).json()
        assert counted["tokens"] == hf_greedy(path, chat_prompt("qwen2_vl", "Hi?", 1), [a], 1)[0]
        answer = ask(data_url, f"file://{tmp_path / 'b.png'}")
        tokens = [int(t.token.removeprefix("token_id:")) if t.token.startswith("token_id:") else t.token
                  for t in answer.choices[0].logprobs.content]
        ids, expected = hf_greedy(path, chat_prompt("qwen2_vl", "Hi?", 2), [a, b], 5)
        tokenizer = load_processor(path).tokenizer
        assert answer.choices[0].message.content == tokenizer.decode(expected)
        assert len(tokens) == 5 and answer.usage.prompt_tokens == len(ids)
        for urls, match in (([data_url] * 3, "at most 2"), (["data:image/png;base64,AAAA"], "image 1"),
                            ([f"file://{tmp_path}/../x.png"], "image 1")):
            with pytest.raises(openai.BadRequestError, match=match):
                ask(*urls)
        assert ask(data_url).choices[0].finish_reason == "length"
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", MODELS)
def test_gpu_equals_transformers(vl_models: dict[str, str], kind: str, no_tf32: None) -> None:
    """On the GPU in float32: transformers' tokens (on the GPU) with decode graphs, and with 24-token steps that cut
    through the images (piecewise graphs, M-RoPE rows through the fused rotary kernel); in bfloat16, where the
    towers take flash attention, graphs give the eager tokens."""
    path = vl_models[kind]
    workload = _workload(kind) * 2
    expected = [hf_greedy(path, p, images, m, "cuda")[1] for p, images, m in workload[:4]] * 2
    for extra in ({}, {"max_num_batched_tokens": 24, "max_num_seqs": 4}):
        llm = LLM(path, **ARGS, **extra)
        assert llm.llm_engine.config.device == "cuda" and llm.llm_engine.runner.graph_runner is not None
        assert [list(o.outputs[0].token_ids) for o in _generate(llm, workload)] == expected
        del llm
    bf16 = [[list(o.outputs[0].token_ids) for o in _generate(LLM(path, **{**ARGS, "dtype": "bfloat16"},
                                                                enforce_eager=eager), workload)] for eager in (True, False)]
    assert bf16[0] == bf16[1]


def test_tensor_parallel_equals_one_process(vl_models: dict[str, str]) -> None:
    """TP=2: the decoder sharded, the vision tower on every rank, each step's encoder work sent with the step."""
    path = vl_models["qwen2_vl"]
    workload = _workload("qwen2_vl")
    one = [list(o.outputs[0].token_ids) for o in _generate(LLM(path, **ARGS), workload)]
    llm = LLM(path, **ARGS, tensor_parallel_size=2, max_num_batched_tokens=24)
    assert [list(o.outputs[0].token_ids) for o in _generate(llm, workload)] == one
    del llm  # its workers stop with it: one parallel world per process at a time
