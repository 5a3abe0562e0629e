"""CUDA graphs: decode graphs and piecewise graphs give the tokens an eager engine gives, float32 greedy,
on steps that mix decodes with prompt chunks under a small token budget (GPU only); on CPU, the cut that
piecewise capture puts at each attention call."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.attention.backend import dummy_metadata
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.layers.attention import forward_context
from tests.conftest import assert_clean

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class _RecordingCut:
    """Runs each attention call itself, as a piecewise capture's warm-up does, optionally zeroing it."""

    def __init__(self, backend, meta, zero: bool) -> None:
        self.backend, self.meta, self.zero, self.calls = backend, meta, zero, []

    def query_buffer(self, num_tokens, num_heads, head_dim, dtype):
        raise AssertionError("only the CUDA path writes q into a buffer")

    def attend(self, query, kv_cache, scale, k_scale=1.0, v_scale=1.0, sliding_window=None, soft_cap=None):
        self.calls.append(kv_cache)
        out = self.backend.forward(query, kv_cache, self.meta, scale, None, k_scale, v_scale, sliding_window, soft_cap)
        return torch.zeros_like(out) if self.zero else out


def test_attention_cut_runs_each_layer_in_order(tiny_models):
    """With a cut in the forward context every attention call goes through it, layer by layer, and the
    model continues from what it returns."""
    engine = LLMEngine.from_kwargs(model=tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=16 << 20, device="cpu")
    runner = engine.runner
    # Two prompts in blocks 1 and 2, writing their keys there.
    bs = runner.block_size
    meta = dataclasses.replace(
        dummy_metadata([5, 3], [5, 3], bs, runner.device), block_tables=torch.tensor([[1], [2]], dtype=torch.int32),
        slot_mapping=torch.tensor([bs + i for i in range(5)] + [2 * bs + i for i in range(3)]),
    )
    ids = torch.arange(8, dtype=torch.int64) + 3
    with torch.inference_mode():
        with forward_context(runner.backend, meta):
            plain = runner.model(ids, ids)
        results = []
        for zero in (False, True):
            cut = _RecordingCut(runner.backend, meta, zero)
            with forward_context(runner.backend, meta, cut):
                results.append(runner.model(ids, ids))
            assert cut.calls == [layer.kv_cache for layer in runner.attn_layers]
    assert torch.equal(results[0], plain) and not torch.allclose(results[1], plain)


def _generate(path: str, prompts: list[list[int]], max_tokens: list[int], enforce_eager: bool) -> tuple[list[list[int]], int]:
    """Tokens, and how many steps the piecewise graphs ran."""
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, enforce_eager=enforce_eager, kv_cache_memory=256 << 20,
              max_num_seqs=16, max_num_batched_tokens=96, max_model_len=512)
    runner, replays = llm.llm_engine.runner, [0]
    if runner.piecewise is not None:
        run = runner.piecewise.run

        def counted(*args, **kwargs):
            replays[0] += 1
            return run(*args, **kwargs)

        runner.piecewise.run = counted
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    del llm, runner
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], replays[0]


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_piecewise_graphs_equal_eager(tiny_models, arch):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 150))] for _ in range(24)]
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    graphs, replays = _generate(tiny_models[arch], prompts, max_tokens, enforce_eager=False)
    eager, none = _generate(tiny_models[arch], prompts, max_tokens, enforce_eager=True)
    assert replays > 5 and none == 0  # the 96-token budget makes mixed steps of up to 96 tokens
    assert graphs == eager
