"""Decoder models as embedders (pagedllm/pooling/), float32 on CPU: LLM.embed's vectors equal transformers' last hidden
states pooled the same way (LAST, MEAN, CLS; normalized or not), alone and in a batch of mixed lengths whose long
prompts run in several chunks (the pooling accumulates across them), with async scheduling; the pooling read from
sentence-transformers' files; clear errors."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from pagedllm import LLM, PoolingParams, SamplingParams
from tests.conftest import assert_clean

ARGS = dict(skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=16 << 20)


def _reference(path: str, prompts: list[list[int]], pooling: str, normalize: bool) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            hidden = model(torch.tensor([p])).last_hidden_state[0]
            vector = {"LAST": hidden[-1], "CLS": hidden[0], "MEAN": hidden.mean(0)}[pooling]
            out.append(torch.nn.functional.normalize(vector, dim=-1) if normalize else vector)
    return out


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.choice([1, 5, 40, 130]))] for _ in range(n)]


@pytest.mark.parametrize("arch, pooling, normalize", [("qwen3", "LAST", True), ("llama", "MEAN", False), ("llama", "CLS", True)])
def test_embed_equals_transformers(tiny_models: dict[str, str], arch: str, pooling: str, normalize: bool) -> None:
    path = tiny_models[arch]
    prompts = _prompts(24, seed=len(pooling))
    expected = _reference(path, prompts, pooling, normalize)
    for async_scheduling in (False, True):
        llm = LLM(path, runner="pooling", pooler_config={"pooling_type": pooling, "normalize": normalize},
                  max_num_batched_tokens=64, async_scheduling=async_scheduling, **ARGS)
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        assert [o.prompt_token_ids for o in outputs] == prompts
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, rtol=1e-4, atol=1e-5)
        assert_clean(llm.llm_engine)
    alone = llm.embed({"prompt_token_ids": prompts[3]}, use_tqdm=False)[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(alone), expected[3], rtol=1e-4, atol=1e-5)


def test_sentence_transformers_files(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """A directory with modules.json runs as a pooling model by itself, pooled as its 1_Pooling config says;
    PoolingParams(normalize=False) overrides the Normalize module."""
    path = str(tmp_path_factory.mktemp("st") / "model")
    shutil.copytree(tiny_models["llama"], path)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}, f)
    prompts = _prompts(4, seed=7)
    llm = LLM(path, **ARGS)
    assert llm.llm_engine.config.runner == "pooling"
    for normalize, out in ((True, llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)),
                           (False, llm.embed([{"prompt_token_ids": p} for p in prompts], PoolingParams(normalize=False),
                                             use_tqdm=False))):
        for o, ref in zip(out, _reference(path, prompts, "MEAN", normalize)):
            torch.testing.assert_close(torch.tensor(o.outputs.embedding), ref, rtol=1e-4, atol=1e-5)


def test_errors(tiny_models: dict[str, str]) -> None:
    path = tiny_models["llama"]
    prompt = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="pooling model"):
        LLM(path, **ARGS).embed(prompt, use_tqdm=False)
    llm = LLM(path, runner="pooling", **ARGS)
    with pytest.raises(ValueError, match="generates nothing"):
        llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed(prompt, PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_type"):
        LLM(path, runner="pooling", pooler_config={"pooling_type": "max"}, **ARGS)
    assert_clean(llm.llm_engine)


def test_server_embeddings(smollm2: str) -> None:
    """`pagedllm serve --runner pooling`: the openai client's embeddings in float and base64 equal LLM.embed's,
    for a string, strings and token ids; LangChain's OpenAIEmbeddings; completions answer 400 there."""
    import numpy as np
    import openai

    from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

    texts = ["The capital of France is Paris.", "Embeddings map text to vectors.", "a"]
    expected = [o.outputs.embedding for o in LLM(smollm2, runner="pooling", max_model_len=256).embed(texts, use_tqdm=False)]
    server = ServerProcess([smollm2, *SMALL_SERVER_ARGS, "--runner", "pooling", "--served-model-name", "smol"])
    try:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
        floats = client.embeddings.create(model="smol", input=texts, encoding_format="float")
        assert [d.index for d in floats.data] == [0, 1, 2] and floats.usage.prompt_tokens > 3
        b64 = client.embeddings.create(model="smol", input=texts[0])  # the client asks for base64 and decodes it
        for got, want in ((floats.data[i].embedding, expected[i]) for i in range(3)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b64.data[0].embedding, expected[0], rtol=1e-4, atol=1e-5)
        ids = LLM(smollm2, runner="pooling", max_model_len=256).get_tokenizer()(texts[1]).input_ids
        by_ids = client.embeddings.create(model="smol", input=[ids], encoding_format="float").data[0].embedding
        np.testing.assert_allclose(by_ids, expected[1], rtol=1e-4, atol=1e-5)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smol", prompt="hi", max_tokens=2)
        from langchain_openai import OpenAIEmbeddings

        lc = OpenAIEmbeddings(model="smol", base_url=server.url("/v1"), api_key="none", check_embedding_ctx_length=False)
        np.testing.assert_allclose(lc.embed_query(texts[0]), expected[0], rtol=1e-4, atol=1e-5)
    finally:
        server.stop()
