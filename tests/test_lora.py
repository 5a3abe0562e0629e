"""Multi-LoRA (pagedllm/lora/), float32 on CPU: PEFT adapters made with `peft` (random A and B: ranks 4 to 16,
rsLoRA, a subset of targets) give transformers + peft's greedy tokens, alone and in one batch mixing four adapters
and the base model, with two slots (adapters swap between steps), chunked prefill, preemption and prefix caching
(the same prompt under different adapters shares no blocks); SmolLM2 with an adapter; clear errors."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("peft")

from pagedllm import LLM, LoRARequest, SamplingParams  # noqa: E402
from tests.conftest import assert_clean  # noqa: E402
from tests.reference.lora import PeftOracle, make_adapter  # noqa: E402

ARGS = dict(skip_tokenizer_init=True, max_model_len=512, kv_cache_memory=16 << 20)
SPECS = [dict(rank=8, alpha=16), dict(rank=4, alpha=8, rslora=True), dict(rank=16, alpha=16, targets=["q_proj", "v_proj"]),
         dict(rank=12, alpha=24, targets=["gate_proj", "up_proj", "down_proj", "o_proj"])]


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[LoRARequest]:
    root = tmp_path_factory.mktemp("lora")
    return [LoRARequest(f"a{i}", i + 1, make_adapter(tiny_models["llama"], str(root / f"a{i}"), seed=i, **spec))
            for i, spec in enumerate(SPECS)]


def test_mixed_batch_equals_peft(tiny_models: dict[str, str], adapters: list[LoRARequest]) -> None:
    base = tiny_models["llama"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(20)]
    shared = prompts[0][:1] + [rng.randrange(3, 512) for _ in range(40)]
    prompts[1:6] = [shared] * 5  # one prompt under the base and every adapter: no block may be shared across them
    loras = [None if i % 5 == 0 else adapters[i % 4] for i in range(len(prompts))]
    loras[1:6] = [None, *adapters]
    max_tokens = [rng.randint(1, 16) for _ in prompts]
    oracle = PeftOracle(base)
    expected = [oracle.greedy(None if lora is None else lora.lora_path, p, m)
                for p, lora, m in zip(prompts, loras, max_tokens)]
    assert len({tuple(expected[i]) for i in range(1, 6)}) == 5  # the adapters do change the outputs
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=16, max_num_batched_tokens=24,
              num_gpu_blocks_override=8, **{**ARGS, "kv_cache_memory": None})
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    for _ in range(2):  # the second time through, the prefix cache holds every prompt (under its own adapter)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert_clean(llm.llm_engine)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.kv_cache.prefix_hits > 0


def test_one_adapter_for_all_and_cpu_cache(tiny_models: dict[str, str], adapters: list[LoRARequest]) -> None:
    """One LoRARequest for every prompt; with one slot and a CPU cache of one, adapters are reloaded from disk."""
    base = tiny_models["llama"]
    llm = LLM(base, enable_lora=True, max_loras=1, max_cpu_loras=1, **ARGS)
    oracle = PeftOracle(base)
    prompt = [7, 8, 9, 100, 200]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for lora in (adapters[0], adapters[3], adapters[0]):
        out = llm.generate([{"prompt_token_ids": prompt}] * 2, params, lora_request=lora, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [oracle.greedy(lora.lora_path, prompt, 6)] * 2
    assert len(llm.llm_engine.runner.lora.cache) == 1


def test_smollm2_adapter(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = make_adapter(smollm2, str(tmp_path_factory.mktemp("lora") / "smol"), rank=8, alpha=32, seed=5)
    llm = LLM(smollm2, enable_lora=True, max_model_len=256)
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer("The capital of France is").input_ids
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}] * 2, params, lora_request=[None, LoRARequest("s", 1, path)],
                       use_tqdm=False)
    oracle = PeftOracle(smollm2)
    assert out[0].outputs[0].token_ids == oracle.greedy(None, prompt, 12)
    assert out[1].outputs[0].token_ids == oracle.greedy(path, prompt, 12)


def test_errors(tiny_models: dict[str, str], adapters: list[LoRARequest], tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tiny_models["llama"]
    prompt = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(base, **ARGS).generate(prompt, lora_request=adapters[0], use_tqdm=False)
    llm = LLM(base, enable_lora=True, max_lora_rank=8, **ARGS)
    root = tmp_path_factory.mktemp("bad-lora")
    embed = make_adapter(base, str(root / "embed"), targets=["embed_tokens"], seed=9)
    for lora, match in ((LoRARequest("missing", 9, str(root / "none")), "no adapter_config.json"),
                        (adapters[2], "rank 16 exceeds max_lora_rank=8"),
                        (LoRARequest("embed", 10, embed), "targets modules"),
                        (LoRARequest("clash", 1, adapters[1].lora_path), None)):
        if match is None:  # id 1 taken by another path
            llm.generate(prompt, lora_request=adapters[0], use_tqdm=False)
            match = "already"
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, lora_request=lora, use_tqdm=False)
    assert_clean(llm.llm_engine)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("zero", 0, "x")


def test_server(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`pagedllm serve --enable-lora --lora-modules`: adapters listed with their parent, chosen by "model" (the
    offline engine's tokens for the same adapter), loaded and unloaded at runtime, clear 4xx errors, the metric."""
    import httpx
    import openai

    from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

    root = tmp_path_factory.mktemp("lora-server")
    first = make_adapter(smollm2, str(root / "first"), rank=8, alpha=32, seed=11)
    second = make_adapter(smollm2, str(root / "second"), rank=4, alpha=16, seed=12)
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = LLM(smollm2, enable_lora=True, max_loras=2, max_model_len=256)
    expected = [o.outputs[0].text for o in offline.generate([prompt] * 3, params, use_tqdm=False,
                                                            lora_request=[None, LoRARequest("first", 1, first),
                                                                          LoRARequest("second", 2, second)])]
    server = ServerProcess([smollm2, *SMALL_SERVER_ARGS, "--served-model-name", "base", "--enable-lora", "--max-loras", "2",
                            "--lora-modules", f"first={first}", "--allow-runtime-lora-updating"])
    try:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "first"} and models["first"].model_extra["parent"] == "base"

        def complete(model: str) -> str:
            response = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert response.model == model  # an adapter answers under its own name
            return response.choices[0].text

        assert [complete("base"), complete("first")] == expected[:2]
        with pytest.raises(openai.NotFoundError):
            complete("second")
        bad = httpx.post(server.url("/v1/load_lora_adapter"), json={"lora_name": "x", "lora_path": str(root / "none")})
        assert bad.status_code == 400 and "adapter_config.json" in bad.text
        ok = httpx.post(server.url("/v1/load_lora_adapter"), json={"lora_name": "second", "lora_path": second})
        assert ok.status_code == 200, ok.text
        assert complete("second") == expected[2]
        assert 'pagedllm:lora_requests_info{max_lora="2"' in httpx.get(server.url("/metrics")).text
        assert httpx.post(server.url("/v1/unload_lora_adapter"), json={"lora_name": "second"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            complete("second")
        assert httpx.post(server.url("/v1/unload_lora_adapter"), json={"lora_name": "second"}).status_code == 404
        assert complete("first") == expected[1]
    finally:
        server.stop()


@pytest.mark.parametrize("layout, seed, picks", [
    ({"tensor_parallel_size": 2}, 4, [None, 0, 1, 2, 3, None, 1, 3]),
    ({"pipeline_parallel_size": 2}, 5, [2, None, 0, 1, 2, 3, 0, None]),
], ids=["tp2", "pp2"])
def test_parallel_equals_one_process(tiny_models: dict[str, str], adapters: list[LoRARequest], layout: dict[str, int],
                                     seed: int, picks: list[int | None]) -> None:
    """TP=2: B split by output rows on q/k/v and gate/up, A by input columns on o and down (each rank's partial delta
    summed by the layer's all-reduce); every rank loads the driver's adapters into the driver's slots. PP=2: each
    stage loads its own layers' share of every adapter (the driver's slots, broadcast with the step)."""
    base = tiny_models["llama"]
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(4, 40))]} for _ in range(8)]
    loras = [None if i is None else adapters[i] for i in picks]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(base, enable_lora=True, max_loras=2, **ARGS).generate(
        prompts, params, lora_request=loras, use_tqdm=False)]
    llm = LLM(base, enable_lora=True, max_loras=2, num_gpu_blocks_override=64, **layout,
              **{**ARGS, "kv_cache_memory": None})
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)] == expected
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager(tiny_models: dict[str, str], adapters: list[LoRARequest]) -> None:
    """Decode steps replay graphs whose row-indexed LoRA kernels read each row's slot from a persistent buffer: the
    same tokens as eager steps (segmented kernels), float32, over batches that mix adapters, the base, and swaps."""
    base = tiny_models["llama"]
    rng = random.Random(6)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(4, 40))]} for _ in range(24)]
    loras = [None if i % 5 == 0 else adapters[i % 4] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = []
    for eager in (True, False):
        llm = LLM(base, enable_lora=True, max_loras=2, dtype="float32", enforce_eager=eager, **ARGS)
        graphs = llm.llm_engine.runner.graph_runner
        assert (graphs is None) == eager and (eager or graphs.lora_slots is not None)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)])
        assert_clean(llm.llm_engine)
        del llm
    assert outputs[0] == outputs[1]
