"""CUDA graphs (GPU only; skipped on CPU): decode graphs and piecewise graphs give the tokens an eager
engine gives, float32 greedy, on steps that mix decodes with prompt chunks under a small token budget."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_clean

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


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


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_piecewise_graphs_equal_eager(tiny_models, arch):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 150))] for _ in range(24)]
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    graphs, replays = _generate(tiny_models[arch], prompts, max_tokens, enforce_eager=False)
    eager, none = _generate(tiny_models[arch], prompts, max_tokens, enforce_eager=True)
    assert replays > 5 and none == 0  # the 96-token budget makes mixed steps of up to 96 tokens
    assert graphs == eager
