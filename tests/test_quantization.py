"""FP8 weights (pagedllm/quantization/), float32 on CPU: the quantize/dequantize helpers against float64; the method
registry's choices and refusals; greedy tokens equal to transformers' model with the same fp8 math hooked in
(tests/reference/fp8.py) for `--quantization fp8` and for each checkpoint format we write (compressed-tensors, HF
block-wise on whole and partial 128-blocks, per-tensor static with KV scales); the compressed-tensors checkpoint also
against transformers' own loader; dummy weights; TP=2 equal to TP=1; the perplexity tool."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.linear import Shard
from pagedllm.quantization import fp8_utils as fq
from pagedllm.quantization import resolve_quant_method
from pagedllm.quantization.fp8 import Fp8LinearMethod
from tests.conftest import assert_clean
from tests.reference.fp8 import fp8_oracle, install_fp8_hooks, make_fp8_checkpoint
from tests.reference.models import HFOracle, make_tiny_model

ARGS = dict(skip_tokenizer_init=True, kv_cache_memory=64 << 20, max_model_len=512)


# Helpers against float64


def _e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """float64 reference: nearest float8_e4m3fn value (ties to the even code), saturating at +-448."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    codes[codes.isnan()] = float("inf")
    x = x.double().clamp(-448, 448)
    dist = (x[:, None] - codes[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    even = ties & (torch.arange(256) % 2 == 0)[None, :]
    pick = torch.where(even.any(dim=1), even.float().argmax(dim=1), ties.float().argmax(dim=1))
    return codes[pick]


def test_quantize_rounds_to_nearest_even_and_saturates() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10 ** torch.empty(20000).uniform_(-4, 3, generator=g),
                   torch.tensor([448.0, 449.0, 464.0, 1e6, -1e6, 0.0, -0.0, 2.0**-9, 2.0**-10, 0.5 * 2.0**-9])])
    for scale in (1.0, 0.25, 8.0):  # powers of two: x / scale is exact, so only the fp8 rounding is tested
        got = fq.quantize(x, torch.tensor(scale)).double()
        assert not got.isnan().any()
        torch.testing.assert_close(got, _e4m3_round(x.double() / scale), rtol=0, atol=0)


def test_scales_per_token_block_and_group() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 200, generator=g) * 3
    x[5] = 0  # an all-zero row: finite scale, zeros out
    q, s = fq.quantize_per_token(x)
    ref = (x.double().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    torch.testing.assert_close(s.double(), ref, rtol=1e-7, atol=0)
    assert (q.float().abs().amax(1)[torch.arange(300) != 5] == 448).all() and (q[5].float() == 0).all()
    deq = q.double() * s.double()
    assert ((deq - x.double()).abs() <= x.double().abs() * 2**-4 + s.double() * 2**-9 + 1e-12).all()  # 3 mantissa bits
    q, grid = fq.quantize_blocks(x, 128, 128)  # 300 x 200: partial blocks on both edges (ceil-div grid)
    assert grid.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            block = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double()
            assert abs(grid[i, j].item() - block.abs().max().item() / 448) <= 1e-7 * grid[i, j].item()
            got = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double()
            assert got.abs().max() == 448
    fake = fq.fake_quantize(x, "group")
    for j in (0, 128):
        part = x[:, j : j + 128]
        torch.testing.assert_close(fake[:, j : j + 128], fq.fake_quantize(part, "token"), rtol=0, atol=0)


# Registry


def _hf(qc: dict | None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=qc)


def test_registry_choices_and_errors() -> None:
    assert resolve_quant_method(_hf(None), None) is None
    online = resolve_quant_method(_hf(None), "fp8")
    assert isinstance(online, Fp8LinearMethod) and (online.weights, online.activations, online.serialized) == ("channel", "token", False)
    block = resolve_quant_method(_hf({"quant_method": "fp8", "weight_block_size": [128, 128]}), None)
    assert (block.weights, block.activations, block.serialized) == ("block", "group", True)
    dummy = resolve_quant_method(_hf({"quant_method": "fp8", "activation_scheme": "static"}), None, "dummy")
    assert (dummy.weights, dummy.activations, dummy.serialized) == ("channel", "token", False)
    with pytest.raises(ValueError, match="'awq' needs a checkpoint quantized with it"):
        resolve_quant_method(_hf(None), "awq")
    with pytest.raises(ValueError, match="'bitsandbytes'.*fp8"):
        resolve_quant_method(_hf({"quant_method": "bitsandbytes"}), None)
    with pytest.raises(ValueError, match="compressed-tensors.*cannot requantize"):
        resolve_quant_method(_hf({"quant_method": "compressed-tensors"}), "fp8")


def test_block_scales_need_aligned_row_parallel_splits() -> None:
    method = Fp8LinearMethod("block", "group", serialized=True)
    layer = SimpleNamespace(shard=Shard(rows=256, start=64, size=64), in_features=64, out_features=128)
    with pytest.raises(ValueError, match="multiples of 128"):
        method._block_rows(layer, torch.ones(1, 2), 128, 0, 128)


# Engine against the fp8 reference


def _prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 120))] for _ in range(n)]


def assert_greedy_matches(llm: LLM, oracle: HFOracle, prompts: list[list[int]], max_tokens: int = 16) -> None:
    """Token-identical, except where the reference itself sits on a near-tie: dynamic fp8 activations turn the
    last-bit differences of any two float32 implementations (fused q/k/v here, separate there) into a whole fp8
    step now and then, which can swap two tokens within a few hundredths of a nat. At most one such prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    oracle.model.generation_config.eos_token_id = None  # as ignore_eos: no EOS suppression (min_new_tokens) there
    ties = 0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        got, want = out.outputs[0].token_ids, oracle.greedy(prompt, max_tokens)
        if got != want:
            j = next(k for k in range(max_tokens) if got[k] != want[k])
            ref = oracle.logprobs(prompt + want[:j])[-1]
            gap = abs(ref[want[j]].item() - ref[got[j]].item())
            assert gap < 0.1, f"prompt {i}: token {j} is {got[j]}, reference {want[j]} ({gap:.3f} nats apart)"
            ties += 1
    assert ties <= 1, f"{ties} near-tie divergences"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_online_fp8_matches_reference(tiny_models: dict[str, str], arch: str) -> None:
    llm = LLM(tiny_models[arch], quantization="fp8", **ARGS)
    qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.out_features, 1)
    assert llm.llm_engine.runner.model.lm_head.weight.dtype == torch.float32
    assert_greedy_matches(llm, fp8_oracle(tiny_models[arch], "online"), _prompts(512))


@pytest.fixture(scope="module")
def block_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model("llama-block", str(tmp_path_factory.mktemp("tiny") / "llama-block"))


@pytest.mark.parametrize("arch, fmt", [("llama", "compressed-tensors"), ("qwen3", "fp8-tensor"), ("llama-block", "fp8-block")])
def test_checkpoint_formats(tiny_models: dict[str, str], block_model: str, tmp_path_factory: pytest.TempPathFactory,
                            arch: str, fmt: str) -> None:
    src = block_model if arch == "llama-block" else tiny_models[arch]
    path = make_fp8_checkpoint(src, str(tmp_path_factory.mktemp("fp8") / fmt), fmt)
    llm = LLM(path, **ARGS)
    model = llm.llm_engine.runner.model
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    if fmt == "fp8-tensor":  # the checkpoint's KV-cache scales, on each layer's Attention
        for i, layer in enumerate(model.model.layers):
            assert (layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) == (0.5 + i / 8, 0.25 + i / 8)
    prompts = _prompts(512, seed=3)
    assert_greedy_matches(llm, fp8_oracle(src, fmt), prompts)
    if fmt == "compressed-tensors":  # transformers + compressed-tensors decompress it to the same weights
        pytest.importorskip("compressed_tensors")
        from transformers import AutoModelForCausalLM
        from transformers.utils.quantization_config import CompressedTensorsConfig

        oracle = HFOracle(src)
        oracle.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
        install_fp8_hooks(oracle.model, fmt, quantize_weights=False)  # activations only: the weights are dequantized
        assert_greedy_matches(llm, oracle, prompts)


def test_smollm2_block_partial_blocks(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """hidden 576 = 4.5 blocks, k/v 192 = 1.5 blocks fused after q's 4.5: ceil-div grids, rows of partial blocks.
    Compared on prompt logprobs (prefill) rather than greedy tokens: over 30 layers, per-group fp8 activations turn
    the last-bit differences between a 1-row decode product and a prefill one into ~0.1 nat, enough to swap
    near-tied tokens of a random prompt (seen once here); prefill logprobs match the reference exactly."""
    path = make_fp8_checkpoint(smollm2, str(tmp_path_factory.mktemp("fp8") / "smollm2-block"), "fp8-block")
    llm, oracle = LLM(path, **ARGS), fp8_oracle(smollm2, "fp8-block")
    prompts = _prompts(49152, n=3, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)):
        ref = oracle.logprobs(prompt)
        assert out.prompt_logprobs is not None
        for k in range(1, len(prompt)):
            assert abs(out.prompt_logprobs[k][prompt[k]].logprob - ref[k - 1, prompt[k]].item()) < 1e-3


def test_dummy_weights(tiny_models: dict[str, str], block_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    block = make_fp8_checkpoint(block_model, str(tmp_path_factory.mktemp("fp8") / "fp8-block"), "fp8-block")
    for path, kwargs in ((tiny_models["llama"], {"quantization": "fp8"}), (block, {})):
        llm = LLM(path, load_format="dummy", **kwargs, **ARGS)
        assert llm.llm_engine.runner.model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


def test_tensor_parallel_block_fp8(block_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Sharded fp8 weights and block scales (row-parallel columns on block boundaries): TP=2 == TP=1."""
    path = make_fp8_checkpoint(block_model, str(tmp_path_factory.mktemp("fp8") / "fp8-block"), "fp8-block")
    prompts, params = _prompts(512, n=6, seed=5), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        llm = LLM(path, tensor_parallel_size=tp, **ARGS)
        runs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)])
        llm.llm_engine.shutdown()
    assert runs[0] == runs[1]


def test_perplexity_tool(smollm2: str) -> None:
    from pagedllm.benchmarks import perplexity
    from pagedllm.benchmarks.cli import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "perplexity", "--model", smollm2, "--max-text-tokens", "96", "--window", "48",
                              "--quantization", "fp8", "--kv-cache-memory", str(64 << 20)])
    assert args.func is perplexity.main
    result = args.func(args)
    assert result["tokens_scored"] == 94 and result["windows"] == 2 and 1 < result["perplexity"] < 100


def test_fp8_activation_producers_wired(tiny_models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the GEMM takes per-token fp8 rows (forced here: CPU has none), the norms before q/k/v and gate/up and the
    SiLU-and-mul before down quantize their own output; the final norm and q/k norms, which feed no fp8 layer, don't."""
    monkeypatch.setattr(Fp8LinearMethod, "_gpu_gemm_applies", lambda self, layer: "rows")
    monkeypatch.setattr(Fp8LinearMethod, "apply", lambda self, layer, x, bias: x[..., :1].expand(*x.shape[:-1], layer.out_features))
    inner = LLM(tiny_models["qwen3"], quantization="fp8", **ARGS).llm_engine.runner.model.model
    fp8 = torch.float8_e4m3fn
    for layer in inner.layers:
        assert layer.input_layernorm.quant_rows == layer.post_attention_layernorm.quant_rows == layer.mlp.act.quant_rows == fp8
        assert layer.self_attn.q_norm.quant_rows is None
    assert inner.norm.quant_rows is None


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 GPU")
@pytest.mark.parametrize("fmt", ["fp8", "fp8-block", "w8a8"])
def test_gpu_quantized_paths_match_unfused(tiny_models: dict[str, str], block_model: str, fmt: str,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """bf16 on the GPU: the same 8-bit math whether the producers quantize (fused) or the layers do (one kernel pass),
    so greedy tokens over a mixed batch (prefill GEMMs, decode GEMVs) are identical; block-wise fp8 checkpoints run
    the Triton block-scaled GEMM, W8A8 ones its int8 variant."""
    from tests.reference.int_quant import make_int_checkpoint

    root = tmp_path_factory.mktemp("gpu-quant")
    if fmt == "fp8-block":
        model = make_fp8_checkpoint(block_model, str(root / fmt), "fp8-block")
    elif fmt == "w8a8":
        model = make_int_checkpoint(tiny_models["llama"], str(root / fmt), "ct-w8a8")[0]
    else:
        model = tiny_models["llama"]
    prompts = [{"prompt_token_ids": [random.Random(i).randrange(5, 200) for _ in range(20 + 7 * i)]} for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model, **dict(ARGS, dtype="bfloat16", quantization="fp8" if fmt == "fp8" else None))
    runner_model = llm.llm_engine.runner.model
    layer = runner_model.model.layers[0]
    assert layer.mlp.down_proj.fp8_gemm == ("blocks" if fmt == "fp8-block" else "rows")
    assert layer.mlp.act.quant_rows == {"fp8": torch.float8_e4m3fn, "w8a8": torch.int8}.get(fmt)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for module in runner_model.modules():
        if getattr(module, "quant_rows", None) is not None:
            module.quant_rows = None
    unfused = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert fused == unfused
