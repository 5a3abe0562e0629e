"""GGUF weights kept quantized (pagedllm/quantization/gguf.py), on CPU through the method's torch reference: each block
format against gguf.quants.dequantize; the bundled SmolLM2 Q4_1 file's blocks (forced onto CPU with
PAGEDLLM_GGUF_QUANTIZED=1) giving the dequantized conversion's greedy tokens, as they are the same weights; the rotary
un-permutation on raw rows; tensor-parallel column splits on block boundaries; the random Q4_K_M dummy load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from pagedllm import LLM, SamplingParams
from pagedllm.layers.linear import Shard
from pagedllm.quantization import gguf as g
from pagedllm.quantization import resolve_quant_method

gguf_quants = pytest.importorskip("gguf.quants")

ARGS = dict(skip_tokenizer_init=True, kv_cache_memory=64 << 20, max_model_len=256)


@pytest.mark.parametrize("qtype", list(g.BLOCKS), ids=lambda t: g.NAMES[t])
def test_reference_matches_gguf_package(qtype: int) -> None:
    raw = g.random_blocks(qtype, 6, 512, torch.Generator().manual_seed(qtype))
    expected = torch.from_numpy(gguf_quants.dequantize(raw.numpy(), qtype))
    assert torch.equal(g.dequantize(raw, qtype, 512), expected)
    assert expected.abs().max() < 1 and expected.std() > 1e-3  # dummy-sized weights, no inf or NaN


def test_reference_matches_gguf_quantize() -> None:
    """Blocks gguf.quants writes itself (it quantizes the 32-element types only)."""
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).numpy()
    for qtype in (g.Q4_0, g.Q4_1, g.Q8_0):
        raw = torch.from_numpy(gguf_quants.quantize(w, qtype))
        assert torch.equal(g.dequantize(raw, qtype, 256), torch.from_numpy(gguf_quants.dequantize(raw.numpy(), qtype)))


def _stub_layer(out: int, k_rows: int, k_start: int, k_size: int) -> nn.Module:
    """What load_param reads of a row-parallel layer: one output shard, this rank's input columns."""
    layer = nn.Module()
    layer.in_features, layer.out_features, layer.shard = k_size, out, Shard(k_rows, k_start, k_size)
    layer.weight = nn.Parameter(torch.empty(out, k_size), requires_grad=False)
    return layer


def test_row_parallel_columns_split_on_blocks() -> None:
    method = g.GgufLinearMethod()
    raw = g.random_blocks(g.Q4_0, 8, 512, torch.Generator().manual_seed(1))
    layer = _stub_layer(8, 512, 128, 256)  # columns 128..384: blocks 4..11 of 32
    method.create_weights(layer)
    method.load_param(layer, "weight", layer.weight, g.GgufTensor(g.Q4_0, (8, 512), raw), 0)
    method.process_weights_after_loading(layer)
    (part,) = layer.gguf_parts
    assert torch.equal(g.dequantize(part.weight, g.Q4_0, 256), g.dequantize(raw, g.Q4_0, 512)[:, 128:384])
    layer = _stub_layer(8, 512, 128, 256)
    method.create_weights(layer)
    with pytest.raises(ValueError, match="blocks of 256"):  # a K-quant block is 256 columns
        method.load_param(layer, "weight", layer.weight,
                          g.GgufTensor(g.Q4_K, (8, 512), g.random_blocks(g.Q4_K, 8, 512)), 0)


def test_raw_rows_are_the_conversions_weights(smollm2: str) -> None:
    """The file's blocks, q/k rows un-permuted as raw rows, dequantize to the converted directory's weights."""
    from safetensors import safe_open

    from pagedllm.models.gguf import SOURCE_KEY, raw_linear_weights

    with open(os.path.join(smollm2, "config.json")) as f:
        raw = raw_linear_weights(json.load(f)[SOURCE_KEY])
    assert len(raw) == 30 * 7
    with safe_open(os.path.join(smollm2, "model.safetensors"), framework="pt") as f:
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
            name = f"model.layers.3.{proj}.weight"
            t = raw[name]
            assert t.qtype == g.Q4_1 and t.heads == {"self_attn.q_proj": 9, "self_attn.k_proj": 3}.get(proj, 0)
            assert torch.equal(g.dequantize(t.read(), t.qtype, t.shape[1]), f.get_tensor(name)), name


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]


def test_smollm2_blocks_match_dequantized(smollm2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[1, 504, 3458, 282, 4649, 314, 23, 7000, 12, 9]]
    monkeypatch.setenv(g.ENV, "0")
    dense = LLM(smollm2, **ARGS)
    assert dense.llm_engine.runner.model.model.layers[0].mlp.down_proj.quant_method is None
    want = _greedy(dense, prompts)
    del dense
    monkeypatch.setenv(g.ENV, "1")  # the blocks on CPU: the method's torch reference
    llm = LLM(smollm2, **ARGS)
    layer = llm.llm_engine.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.quant_method, g.GgufLinearMethod)
    assert [(p.qtype, p.rows) for p in layer.self_attn.qkv_proj.gguf_parts] == [(g.Q4_1, 576 + 2 * 192)]
    assert not hasattr(layer.mlp.down_proj, "weight")
    assert llm.llm_engine.runner.model.lm_head.quant_method is None
    assert _greedy(llm, prompts) == want


def test_dummy_q4_k_m(tmp_path: os.PathLike) -> None:
    """Random Q4_K_M blocks on a tiny config whose widths are whole K-quant blocks: Q6_K for v_proj and down_proj on
    the layers llama.cpp's mix picks (the last of two here), Q4_K elsewhere, a fused q/k/v of two parts."""
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                max_position_embeddings=256).save_pretrained(str(tmp_path))
    runs = []
    for _ in range(2):
        llm = LLM(str(tmp_path), load_format="dummy", quantization="gguf", **ARGS)
        layers = llm.llm_engine.runner.model.model.layers
        runs.append(_greedy(llm, [[5, 6, 7, 8]]))
        del llm
    assert [(p.qtype, p.start, p.rows) for p in layers[1].self_attn.qkv_proj.gguf_parts] == [(g.Q4_K, 0, 384),
                                                                                          (g.Q6_K, 384, 128)]
    assert [p.qtype for p in layers[0].self_attn.qkv_proj.gguf_parts] == [g.Q4_K]
    assert [p.qtype for p in layers[1].mlp.down_proj.gguf_parts] == [g.Q6_K]
    assert layers[0].mlp.gate_up_proj.gguf_parts[0].weight.shape == (1024, 256 // 256 * 144)
    assert runs[0] == runs[1]  # the same random model every time


def test_q4_k_m_mix_and_registry() -> None:
    types = [g.q4_k_m_type(f"model.layers.{i}.mlp.down_proj.weight", 32) for i in range(32)]
    assert [i for i, t in enumerate(types) if t == g.Q6_K] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert g.q4_k_m_type("model.layers.0.self_attn.q_proj.weight", 32) == g.Q4_K
    hf = type("Config", (), {"num_hidden_layers": 2})()
    assert isinstance(resolve_quant_method(hf, "gguf", "dummy"), g.GgufLinearMethod)
    assert resolve_quant_method(hf, "gguf", "auto") is None  # a .gguf file's: the loader picks it per device
