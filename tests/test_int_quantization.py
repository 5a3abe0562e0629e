"""Integer-weight checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized and int-quantized), float32 on CPU:
packing against the references' explicit loops; the registry's names and refusals; each format written by
tests/reference/int_quant.py loads and its greedy tokens equal transformers' on the float model its codes stand for
(W4A16 / W8A16 exactly; W8A8 with int8 activations hooked into the reference, up to a near-tie); compressed-tensors
checkpoints also against transformers' own decompression; act order; TP=2 equal to TP=1; dummy weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM
from pagedllm.quantization import int_utils as iu
from pagedllm.quantization import resolve_quant_method
from pagedllm.quantization.awq import ORDER
from tests.reference.int_quant import AWQ_ORDER, install_int8_hooks, make_int_checkpoint, pack_along
from tests.reference.models import HFOracle
from tests.test_quantization import ARGS, _prompts, assert_greedy_matches


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_reference_loops(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (24, 64), generator=g)
    for dim in (0, 1):
        ref = pack_along(codes, bits, dim)
        assert torch.equal(iu.pack(codes, bits, dim), ref)
        assert torch.equal(iu.unpack(ref, bits, dim).long(), codes)
    assert ORDER == AWQ_ORDER
    if bits == 4:
        awq = pack_along(codes, 4, 1, AWQ_ORDER)
        assert torch.equal(iu.pack(codes, 4, 1, ORDER), awq) and torch.equal(iu.unpack(awq, 4, 1, ORDER).long(), codes)


def test_quantize_round_trip() -> None:
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(0))
    for bits, group, sym in ((4, 64, True), (4, 32, False), (8, 200, True)):
        codes, scales, zeros = iu.quantize(w, bits, group, sym)
        deq = iu.dequantize(iu.pack(codes, bits), scales, zeros, bits, group, 200)
        step = scales.repeat_interleave(group, 1)[:, :200]
        assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def _hf(qc: dict | None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=qc)


def test_registry_names_and_errors() -> None:
    gptq = resolve_quant_method(_hf({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True}), None)
    assert (gptq.name, gptq.bits, gptq.group_size, gptq.serialized) == ("gptq", 8, None, True)
    assert resolve_quant_method(_hf({"quant_method": "gptq", "bits": 4}), "gptq_marlin").name == "gptq"
    dummy = resolve_quant_method(_hf(None), "awq", "dummy")
    assert (dummy.name, dummy.bits, dummy.group_size, dummy.serialized) == ("awq", 4, 128, False)
    assert resolve_quant_method(_hf(None), "gguf") is None  # GGUF files load through models/gguf.py
    with pytest.raises(ValueError, match="'gptq' needs a checkpoint quantized with it"):
        resolve_quant_method(_hf(None), "gptq")
    with pytest.raises(ValueError, match="Unsupported quantization method 'bitsandbytes'"):
        resolve_quant_method(_hf(None), "bitsandbytes")
    with pytest.raises(ValueError, match="awq: unsupported configuration.*version='gemv'"):
        resolve_quant_method(_hf({"quant_method": "awq", "version": "gemv"}), None)
    with pytest.raises(ValueError, match="group size 12 must be a positive multiple of 8"):
        resolve_quant_method(_hf({"quant_method": "gptq", "bits": 4, "group_size": 12}), None)
    w3 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "strategy": "group", "group_size": 128}}}}
    with pytest.raises(ValueError, match="unsupported pack-quantized scheme: weights 3-bit int group"):
        resolve_quant_method(_hf(w3), None)


def _check(llm: LLM, oracle: HFOracle, seed: int, exact: bool) -> None:
    """exact: W4A16 / W8A16 on CPU multiply the dequantized float32 weight, the reference's own numbers."""
    prompts = _prompts(512, n=6, seed=seed)
    if exact:
        from pagedllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        oracle.model.generation_config.eos_token_id = None  # as ignore_eos: no EOS suppression (min_new_tokens)
        for prompt, out in zip(prompts, outputs):
            assert out.outputs[0].token_ids == oracle.greedy(prompt, 12)
    else:
        assert_greedy_matches(llm, oracle, prompts, max_tokens=12)


FORMAT_CASES = [("llama", "gptq"), ("qwen2", "gptq-act"), ("llama", "gptq8"), ("qwen3", "awq"), ("llama", "ct-w4a16"),
                ("qwen2", "ct-w4a16-asym"), ("llama", "ct-w8a16"), ("llama", "ct-w8a8")]


@pytest.mark.parametrize("arch, fmt", FORMAT_CASES)
def test_checkpoint_formats(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory, arch: str,
                            fmt: str) -> None:
    path, ref = make_int_checkpoint(tiny_models[arch], str(tmp_path_factory.mktemp("int") / f"{arch}-{fmt}"), fmt)
    llm = LLM(path, **ARGS)
    model = llm.llm_engine.runner.model
    layer = model.model.layers[0].self_attn.qkv_proj
    if fmt == "ct-w8a8":
        assert layer.weight.dtype == torch.int8
    else:
        assert layer.int_weight.packed.dtype == torch.int32 and not hasattr(layer, "weight")
        assert (layer.int_weight.perm is not None) == (fmt == "gptq-act")
    oracle = HFOracle(ref)
    if fmt == "ct-w8a8":
        install_int8_hooks(oracle.model)
    _check(llm, oracle, seed=len(fmt), exact=fmt != "ct-w8a8")


@pytest.mark.parametrize("fmt", ["ct-w4a16-asym", "ct-w8a8"])
def test_compressed_tensors_own_decompression(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                                              fmt: str) -> None:
    """transformers + the compressed-tensors package decompress our test checkpoints to the same weights (to the
    last bit or so: their dequantization rounds in another order), so our writer lays the format out as theirs."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    path, ref = make_int_checkpoint(tiny_models["llama"], str(tmp_path_factory.mktemp("int") / fmt), fmt)
    oracle = HFOracle(ref)
    oracle.model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    if fmt == "ct-w8a8":
        install_int8_hooks(oracle.model)
    _check(LLM(path, **ARGS), oracle, seed=7, exact=False)


def test_tensor_parallel(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Packed codes, scales and zero points split by rows (q/k/v, gate/up) and by whole groups of input columns
    (o_proj, down_proj): TP=2 == TP=1. Act order cannot split a layer's input columns: a clear error."""
    from pagedllm import SamplingParams

    path, _ = make_int_checkpoint(tiny_models["llama"], str(tmp_path_factory.mktemp("int") / "awq"), "awq")
    prompts, params = _prompts(512, n=4, seed=5), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        llm = LLM(path, tensor_parallel_size=tp, **ARGS)
        runs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                  use_tqdm=False)])
        llm.llm_engine.shutdown()
    assert runs[0] == runs[1]
    act, _ = make_int_checkpoint(tiny_models["llama"], str(tmp_path_factory.mktemp("int") / "act"), "gptq-act")
    with pytest.raises(Exception, match="act-order"):
        LLM(act, tensor_parallel_size=2, **ARGS)


def test_dummy_weights(tiny_models: dict[str, str]) -> None:
    """Random 16-bit weights quantized at load into each packed layout (benchmarks without checkpoints)."""
    from pagedllm import SamplingParams

    for quantization in ("gptq", "awq"):
        llm = LLM(tiny_models["llama"], load_format="dummy", quantization=quantization, **ARGS)
        qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
        assert qkv.int_weight.bits == 4 and qkv.int_weight.group_size == 64  # 128 > the 64 input features
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
