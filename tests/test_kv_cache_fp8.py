"""--kv-cache-dtype fp8 on the CPU (torch backend, float32 models): the pool's size, the torch write and read against
the float64 reference, the engine under chunked prefill + preemption + prefix caching against an engine whose float32
cache holds the same quantized values, and SmolLM2's greedy tokens and logprobs against a float32 cache."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.attention.backend import KV_FP8, dummy_metadata, quantize_fp8
from pagedllm.attention.torch_backend import TorchAttentionBackend, write_kv
from pagedllm.kernels.paged_attention import paged_attention_ref
from pagedllm.outputs import RequestOutput
from tests.conftest import assert_clean


def make_llm(path: str, **kwargs: object) -> LLM:
    return LLM(path, **({"skip_tokenizer_init": True, "max_model_len": 512} | kwargs))


def generate(llm: LLM, prompts: list, max_tokens: int) -> list[RequestOutput]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return outputs


def chosen_logprobs(out: RequestOutput) -> list[float]:
    c = out.outputs[0]
    assert c.logprobs is not None
    return [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]


def test_kv_cache_dtype_is_checked(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3; got 'int8'"):
        make_llm(tiny_models["llama"], kv_cache_dtype="int8")


def test_fp8_pool_holds_four_times_the_float32_blocks(tiny_models: dict[str, str]) -> None:
    """One byte per element against four: the same budget, 4x the blocks (2x those of a bf16 pool)."""
    runners = {name: make_llm(tiny_models["qwen3"], kv_cache_memory=3 << 20, kv_cache_dtype=name).llm_engine.runner
               for name in ("auto", "fp8", "fp8_e4m3")}
    auto, fp8 = runners["auto"], runners["fp8"]
    assert fp8.kv_dtype == runners["fp8_e4m3"].kv_dtype == KV_FP8 and auto.kv_dtype == torch.float32
    assert auto.kv_bytes_per_block() == 4 * fp8.kv_bytes_per_block()
    assert fp8.num_blocks == 4 * auto.num_blocks == runners["fp8_e4m3"].num_blocks
    assert all(layer.kv_cache.dtype == KV_FP8 and layer.kv_cache.shape[1] == fp8.num_blocks for layer in fp8.attn_layers)


def test_torch_backend_reads_and_writes_fp8() -> None:
    """write_kv quantizes with the scales; the torch attention over the float8 cache (decodes batched, prompt chunks
    one by one) matches the float64 reference dequantizing that cache."""
    g = torch.Generator().manual_seed(0)
    query_lens, seq_lens, block_size, k_scale, v_scale = [1, 1, 9, 4], [30, 7, 40, 21], 16, 0.07, 2.5
    meta = dummy_metadata(query_lens, seq_lens, block_size, torch.device("cpu"))
    meta.block_tables = torch.randperm(16, generator=g)[:12].view(4, 3).int()
    cache = torch.zeros(2, 16, block_size, 2, 32, dtype=KV_FP8)
    slots = torch.cat([meta.block_tables[r, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for r, n in enumerate(seq_lens)])
    k, v = torch.randn(2, slots.numel(), 2, 32, generator=g) * torch.tensor([30 * k_scale, 30 * v_scale])[:, None, None, None]
    write_kv(k, v, cache, slots, k_scale, v_scale)
    flat = cache.view(torch.uint8).view(2, -1, 2, 32)
    assert torch.equal(flat[0][slots], quantize_fp8(k, k_scale).view(torch.uint8))
    assert torch.equal(flat[1][slots], quantize_fp8(v, v_scale).view(torch.uint8))
    q = torch.randn(sum(query_lens), 8, 32, generator=g)
    out = TorchAttentionBackend().forward(q, cache, meta, 0.125, None, k_scale, v_scale)
    ref = paged_attention_ref(q, cache, meta.query_start_loc_cpu, seq_lens, meta.block_tables, 0.125, k_scale, v_scale)
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_fp8_engine_equals_emulated_quantization(tiny_models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed workload (shared prefixes, long prompts chunked by 64-token steps, a pool too small for it: preemption)
    with a float8 cache and scales (powers of two, so dequantizing is exact either way) gives the tokens and logprobs
    of a float32 cache whose writes store the same quantized values; both end clean."""
    k_scale, v_scale = 0.5, 2.0
    rng = random.Random(0)
    system = [rng.randrange(3, 512) for _ in range(100)]
    prompts = [{"prompt_token_ids": (system if i % 2 else []) + [rng.randrange(3, 512) for _ in range(rng.randint(5, 150))]}
               for i in range(12)]
    options = dict(max_num_batched_tokens=64, max_num_seqs=8)
    fp8 = make_llm(tiny_models["qwen3"], kv_cache_dtype="fp8", num_gpu_blocks_override=24, **options)
    for layer in fp8.llm_engine.runner.attn_layers:  # as the loader sets them from a checkpoint
        layer.k_scale, layer.v_scale = k_scale, v_scale
        layer.bind_kv_cache(layer.kv_cache)
    got = generate(fp8, prompts, 24)
    engine = fp8.llm_engine
    assert engine.scheduler.num_preemptions > 0 and engine.kv_cache.prefix_hits > 0

    def emulated(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor, *_: float) -> None:
        key, value = (quantize_fp8(x, s).float() * s for x, s in ((key, k_scale), (value, v_scale)))
        write_kv(key, value, kv_cache, slots)

    monkeypatch.setattr("pagedllm.layers.attention.write_kv", emulated)
    expected = generate(make_llm(tiny_models["qwen3"], num_gpu_blocks_override=24, **options), prompts, 24)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    diff = max(abs(a - b) for g, e in zip(got, expected) for a, b in zip(chosen_logprobs(g), chosen_logprobs(e)))
    assert diff < 1e-4


def test_smollm2_fp8_agrees_with_float32_cache(smollm2: str) -> None:
    """SmolLM2-135M, 16 prompts x 8 greedy tokens: float8 KV (scales 1.0) against the float32 cache, compared up to
    each prompt's first different token (after it the contexts differ): the tokens agreed on and the largest
    |logprob difference| of the chosen tokens there. Measured the same way over 32 tokens: 4/16 prompts identical,
    242/512 tokens before the first difference (4 prompts differ at their first token), max |logprob difference|
    0.24; with K/V rounded to bf16 instead (emulated): 14/16, 494/512, 0.023."""
    topics = ["the ocean", "a small town", "machine learning", "the history of Rome", "coffee", "a rainy day", "chess",
              "the moon", "gardening", "jazz music", "mountains", "a lost key", "bread baking", "volcanoes", "trains",
              "the desert"]
    prompts = [f"Write a short paragraph about {t}." for t in topics]
    options = dict(max_model_len=128, kv_cache_memory=32 << 20)
    runs = {name: generate(LLM(smollm2, kv_cache_dtype=name, **options), prompts, 8) for name in ("auto", "fp8")}
    agreed, identical, max_diff = 0, 0, 0.0
    for ref, out in zip(runs["auto"], runs["fp8"]):
        a, b = ref.outputs[0].token_ids, out.outputs[0].token_ids
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agreed, identical = agreed + n, identical + (n == len(a))
        diffs = [abs(x - y) for x, y in zip(chosen_logprobs(ref)[:n], chosen_logprobs(out)[:n])]
        max_diff = max([max_diff, *diffs])
    print(f"\nSmolLM2 fp8 KV vs float32 KV: {identical}/16 prompts identical, {agreed}/128 tokens before the first "
          f"difference, max |logprob diff| {max_diff:.3f}")
    assert agreed >= 64 and max_diff < 0.5
