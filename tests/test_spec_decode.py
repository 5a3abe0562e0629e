"""Speculative decoding (pagedllm/spec_decode/), float32 on CPU: greedy tokens identical to speculation off and to
transformers, for the ngram proposer and a draft model, on SmolLM2 and tiny random Llama / Qwen3 models, alone and in
mixed batches with chunked prefill, prefix caching and forced preemption; temperature > 0 keeps the target's
distribution (the joint law of two tokens against transformers' exact one); penalties, logprobs, stop strings and
max_tokens across accepted runs; the counters; config errors."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer
from tests.conftest import assert_clean
from tests.reference.models import HFOracle, make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
ARGS = dict(skip_tokenizer_init=True, kv_cache_memory=32 << 20, max_model_len=1024)


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Random prompts, most with a repeated stretch (prompt lookup finds it) and some without."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        head = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))]
        prompts.append(head + head[: rng.randint(0, len(head))] if i % 4 else head)
    return prompts


def _greedy_workload(path: str, n: int, seed: int, max_out: int) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """(prompts, greedy ignore_eos params, transformers' tokens for them)."""
    prompts = _prompts(512, n, seed=seed)
    rng = random.Random(seed + 1)
    max_tokens = [rng.randint(1, max_out) for _ in prompts]
    oracle = HFOracle(path)
    oracle.model.generation_config.eos_token_id = None
    expected = [oracle.greedy(p, m) for p, m in zip(prompts, max_tokens)]
    return prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens], expected


def _generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_ngram_proposer() -> None:
    p = NgramProposer(3, 1, 3)
    assert p.propose([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]  # "1 2 3" recurs: what followed it
    assert p.propose([1, 2, 3, 9, 2, 3, 5, 2, 3], 2) == [5, 2]  # the latest earlier occurrence of "2 3"
    assert p.propose([5, 6, 7, 8], 3) == []
    assert p.propose([7, 7, 7, 7], 3) == [7]  # overlapping: only what is known
    assert p.propose([1, 2, 1, 2, 1, 2], 1) == [1]


def test_config_errors() -> None:
    assert SpeculativeConfig.from_user(None) is None
    assert SpeculativeConfig.from_user('{"model": "[ngram]", "num_speculative_tokens": 2}').method == "ngram"
    assert SpeculativeConfig.from_user({"model": "/some/draft", "num_speculative_tokens": 2}).method == "draft_model"
    for bad, match in (({"method": "ngram"}, "num_speculative_tokens"), ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup")):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_user(bad)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_equals_transformers_mixed_batch(tiny_models: dict[str, str], arch: str) -> None:
    """40 requests in one batch, 24-token steps (prompts chunked, drafts cut to the budget), a KV pool small enough
    to preempt: the same tokens as transformers' greedy generate, and as speculation off."""
    path = tiny_models[arch]
    prompts, params, expected = _greedy_workload(path, 40, seed=1, max_out=40)
    llm = LLM(path, speculative_config=NGRAM, max_num_batched_tokens=24, num_gpu_blocks_override=40, **ARGS)
    assert _generate(llm, prompts, params) == expected
    stats = llm.llm_engine.spec.stats
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens and stats.num_drafts > 0
    assert stats.accepted_per_pos == sorted(stats.accepted_per_pos, reverse=True)  # a later draft needs the earlier
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert _generate(llm, prompts, params) == expected  # the prefix cache now holds the prompts


def test_smollm2_chat_alone_and_batched(smollm2: str) -> None:
    """Real text that repeats itself: identical to speculation off, alone and in a batch, with EOS stops."""
    texts = ["Repeat this twice: the quick brown fox jumps over the lazy dog.",
             "List the numbers from one to twenty, separated by commas.",
             "Write a Python function that adds two numbers, then write it again with type hints."]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM(smollm2, max_model_len=512)
    expected = [o.outputs[0].token_ids for o in plain.generate(texts, params, use_tqdm=False)]
    spec = LLM(smollm2, max_model_len=512, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert [o.outputs[0].token_ids for o in spec.generate(texts, params, use_tqdm=False)] == expected
    assert spec.generate(texts[2], params, use_tqdm=False)[0].outputs[0].token_ids == expected[2]
    assert spec.llm_engine.spec.stats.num_accepted_tokens > 0
    assert_clean(spec.llm_engine)


def test_penalties_logprobs_stops_across_accepted_runs(tiny_models: dict[str, str]) -> None:
    """Each verified position samples with its own history (the drafts before it): repetition and frequency
    penalties, min_tokens, logprobs, stop tokens and max_tokens give what speculation off gives."""
    path = tiny_models["llama"]
    prompts = _prompts(512, 12, seed=5)
    rng = random.Random(6)
    stop = [rng.randrange(3, 512) for _ in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(5, 30), ignore_eos=True, logprobs=2,
                             repetition_penalty=1.3 if i % 2 else 1.0, frequency_penalty=0.4 if i % 3 == 0 else 0.0,
                             min_tokens=3 if i % 4 == 1 else 0, stop_token_ids=stop[i : i + 8])
              for i in range(len(prompts))]
    runs = []
    for speculative in (None, NGRAM):
        llm = LLM(path, speculative_config=speculative, **ARGS)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
                      o.outputs[0].logprobs) for o in outputs])
    for plain, spec in zip(*runs):
        assert plain[:3] == spec[:3]
        for a, b in zip(plain[3], spec[3]):  # a chunk's attention sums in another order than a decode's: ~1e-6
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


class _FixedGuess:
    """A proposer that always guesses the same two tokens: drafts that are often right and often wrong."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def propose_batch(self, batch, running):  # type: ignore[no-untyped-def]
        return [self.tokens[:k] for _, k in batch]

    def retain(self, request_ids: set[str]) -> None:
        pass


def test_sampling_keeps_the_target_distribution(tiny_models: dict[str, str]) -> None:
    """temperature 0.8, top_k 2, four tokens: their joint law over 4000 seeded samples, with two guessed drafts per
    verifying step, is within sampling noise of transformers' exact one (each position's softmax), as is
    speculation off's."""
    from pagedllm.spec_decode.decoder import SpecDecoder

    path = tiny_models["qwen3"]
    prompt = [11, 57, 300, 42, 9]
    oracle = HFOracle(path)

    def law(tokens: list[int]) -> dict[int, float]:
        top = torch.topk(oracle.logprobs(tokens)[-1].double() / 0.8, 2)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))

    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(4):
        exact = {seq + (t,): p * q for seq, p in exact.items() for t, q in law(prompt + list(seq)).items()}
    likely = max(exact, key=exact.get)
    params = [SamplingParams(temperature=0.8, top_k=2, max_tokens=4, ignore_eos=True, seed=i) for i in range(4000)]
    for guess in (None, list(likely[1:3])):
        llm = LLM(path, speculative_config=None if guess is None else NGRAM, **ARGS)
        if guess is not None:
            engine = llm.llm_engine
            engine.spec = SpecDecoder(engine.config.speculative_config, 1024, _FixedGuess(guess))
        counts = Counter(tuple(t) for t in _generate(llm, [prompt] * len(params), params))
        tv = 0.5 * sum(abs(counts.get(key, 0) / len(params) - p) for key, p in exact.items())
        assert set(counts) <= set(exact) and tv < 0.05, (guess, tv)
        if guess is not None:
            stats = llm.llm_engine.spec.stats
            assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both outcomes happened


def test_seeded_sampling_is_reproducible(tiny_models: dict[str, str]) -> None:
    llm = LLM(tiny_models["llama"], speculative_config=NGRAM, **ARGS)
    prompts = _prompts(512, 6, seed=9)
    params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=i) for i in range(6)]
    assert _generate(llm, prompts, params) == _generate(llm, prompts, params)


def test_spec_counters_in_stats(tiny_models: dict[str, str]) -> None:
    llm = LLM(tiny_models["llama"], speculative_config=NGRAM, **ARGS)
    _generate(llm, _prompts(512, 8, seed=3), [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 8)
    stats = llm.llm_engine.get_stats().spec_decode
    assert stats is not None and stats.num_drafts > 0 and len(stats.accepted_per_pos) == 3
    assert 1.0 <= stats.mean_acceptance_length <= 4.0
    assert LLM(tiny_models["llama"], **ARGS).llm_engine.get_stats().spec_decode is None
    assert list(itertools.accumulate(stats.accepted_per_pos))[-1] == stats.num_accepted_tokens


@pytest.mark.parametrize("draft", ["itself", "other"])
def test_draft_model(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory, draft: str) -> None:
    """A draft model sharing the vocabulary, its KV in a pool of its own indexed by the target's block tables: greedy
    tokens equal transformers' in a mixed, chunked batch with preemption; drafting with the target itself accepts
    every draft (the same argmax), another random model some."""
    target = tiny_models["llama"]
    path = target if draft == "itself" else make_tiny_model("llama", str(tmp_path_factory.mktemp("draft") / "d"), seed=7)
    prompts, params, expected = _greedy_workload(target, 24, seed=11, max_out=30)
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 3}
    llm = LLM(target, speculative_config=spec, max_num_batched_tokens=32, num_gpu_blocks_override=12, **ARGS)
    assert _generate(llm, prompts, params) == expected
    stats = llm.llm_engine.spec.stats
    assert stats.num_drafts > 0 and llm.llm_engine.scheduler.num_preemptions > 0
    if draft == "itself":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert _generate(llm, prompts, params) == expected  # prefix-cache hits: the draft recomputes its own KV
    llm.llm_engine.spec.propose([])  # the next proposal forgets the finished requests
    assert not llm.llm_engine.spec.proposer.seen


def test_spec_metrics_offline_and_on_the_server_registry(tiny_models: dict[str, str]) -> None:
    """vLLM's spec_decode series: LLM.get_metrics() (offline) and the /metrics text (the same ServerMetrics)."""
    from pagedllm.metrics import CounterMetric, ServerMetrics, VectorMetric

    llm = LLM(tiny_models["llama"], speculative_config=NGRAM, **ARGS)
    tokens = _generate(llm, _prompts(512, 8, seed=4), [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)] * 8)
    stats = llm.llm_engine.get_stats().spec_decode
    metrics = {m.name: m for m in llm.get_metrics() if not m.labels.get("finished_reason")}
    assert metrics["pagedllm:spec_decode_num_drafts"] == CounterMetric(
        "pagedllm:spec_decode_num_drafts", metrics["pagedllm:spec_decode_num_drafts"].labels, stats.num_drafts)
    assert metrics["pagedllm:spec_decode_num_accepted_tokens"].value == stats.num_accepted_tokens
    assert metrics["pagedllm:spec_decode_num_draft_tokens"].value == stats.num_draft_tokens
    per_pos = metrics["pagedllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(per_pos, VectorMetric) and per_pos.values == stats.accepted_per_pos
    assert metrics["pagedllm:generation_tokens"].value == sum(map(len, tokens)) == 200
    assert metrics["pagedllm:request_generation_tokens"].count == 8
    server = ServerMetrics("m", 1024)
    server.record_step(llm.llm_engine.get_stats(), [], 0.0)
    text = server.render()[0].decode()
    assert f'pagedllm:spec_decode_num_drafts_total{{model_name="m"}} {float(stats.num_drafts)}' in text
    assert 'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}' in text


def test_tensor_parallel(tiny_models: dict[str, str]) -> None:
    """TP=2: the driver proposes (the draft model runs whole on rank 0), every rank verifies; tokens as TP=1's."""
    path = tiny_models["llama"]
    prompts = _prompts(512, 8, seed=21)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * len(prompts)
    expected = _generate(LLM(path, **ARGS), prompts, params)
    for spec in (NGRAM, {"method": "draft_model", "model": path, "num_speculative_tokens": 3}):
        llm = LLM(path, speculative_config=spec, tensor_parallel_size=2, **{**ARGS, "kv_cache_memory": None},
                  num_gpu_blocks_override=64)
        try:
            assert _generate(llm, prompts, params) == expected
            assert llm.llm_engine.spec.stats.num_drafts > 0
        finally:
            llm.llm_engine.shutdown()


@pytest.mark.parametrize("layout", ["eagle fc_bias", "eagle own_embedding", "eagle3", "eagle3 own_embedding"])
def test_eagle(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory, layout: str) -> None:
    """EAGLE-1 and EAGLE-3 heads in SafeAILab's layouts (random weights; fc.bias, their own embedding, EAGLE-3's draft
    vocabulary): the first draft after a prompt is a reference head's (transformers' target, plain torch), and greedy
    tokens equal transformers' in a mixed, chunked batch with preemption and prefix hits (the head follows every step,
    prompt chunks included)."""
    from pagedllm.spec_decode.decoder import SpecDecoder
    from tests.reference.eagle import first_draft, first_draft_eagle3, make_eagle3_head, make_eagle_head

    target = tiny_models["llama"]
    method, own = layout.split()[0], layout.endswith("own_embedding")
    where = str(tmp_path_factory.mktemp("eagle") / layout.replace(" ", "-"))
    if method == "eagle3":
        head, reference = make_eagle3_head(target, where, own_embedding=own, seed=4), first_draft_eagle3
    else:
        head, reference = make_eagle_head(target, where, fc_bias=not own, own_embedding=own, seed=3), first_draft
    spec = {"method": method, "model": head, "num_speculative_tokens": 3}
    seen: list[tuple[list[int], list[int]]] = []
    verify = SpecDecoder.verify

    def recording(self, drafts, sampled):  # type: ignore[no-untyped-def]
        seen.append((list(drafts), list(sampled)))
        return verify(self, drafts, sampled)

    prompt = _prompts(512, 2, seed=31)[1]
    llm = LLM(target, speculative_config=spec, **ARGS)
    SpecDecoder.verify = recording  # type: ignore[method-assign]
    try:
        tokens = _generate(llm, [prompt], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])[0]
    finally:
        SpecDecoder.verify = verify  # type: ignore[method-assign]
    assert seen and seen[0][0][0] == reference(target, head, prompt + tokens[:1])
    prompts, params, expected = _greedy_workload(target, 24, seed=33, max_out=30)
    llm = LLM(target, speculative_config=spec, max_num_batched_tokens=32, num_gpu_blocks_override=12, **ARGS)
    assert _generate(llm, prompts, params) == expected
    assert llm.llm_engine.spec.stats.num_drafts > 0 and llm.llm_engine.scheduler.num_preemptions > 0
    assert _generate(llm, prompts, params) == expected


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_errors(tiny_models: dict[str, str], method: str) -> None:
    with pytest.raises(ValueError, match="not an EAGLE"):
        LLM(tiny_models["llama"], speculative_config={"method": method, "model": tiny_models["llama"],
                                                       "num_speculative_tokens": 2}, **ARGS)


def test_structured_output_with_drafts(smollm2: str) -> None:
    """A JSON schema and n-gram drafts: drafts are cut to what the grammar allows, every verified row gets the mask
    after the drafts before it, and the outputs (valid JSON) are those of speculation off."""
    import json

    from pagedllm import StructuredOutputsParams

    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                         "minItems": 4, "maxItems": 6}}, "required": ["items"]}
    prompts = [f"List {n} fruits as JSON with an 'items' array." for n in ("four", "five", "six")]
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema))
    plain = [o.outputs[0].text for o in LLM(smollm2, max_model_len=512).generate(prompts, params, use_tqdm=False)]
    llm = LLM(smollm2, max_model_len=512, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    spec = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert spec == plain and all(len(json.loads(t)["items"]) >= 4 for t in spec)
    assert llm.llm_engine.spec.stats.num_accepted_tokens > 0
    assert_clean(llm.llm_engine)
