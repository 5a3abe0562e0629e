"""Engine behaviour: validation, finish reasons, stops, n > 1, seeds, aborts, block accounting;
the engine fixtures run each test with async scheduling off and on."""

from __future__ import annotations

import math

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.sampling_params import RequestOutputKind
from tests.conftest import assert_clean


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def tiny(tiny_models: dict[str, str], request: pytest.FixtureRequest) -> LLM:
    return LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_model_len=256, async_scheduling=request.param)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def smol(smollm2: str, request: pytest.FixtureRequest) -> LLM:
    return LLM(smollm2, kv_cache_memory=256 << 20, max_model_len=2048, async_scheduling=request.param)


def ids(n: int, start: int = 10) -> dict:
    return {"prompt_token_ids": list(range(start, start + n))}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(top_k=-3), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_requests_that_could_never_run_are_rejected(tiny: LLM) -> None:
    engine = tiny.llm_engine
    cases = [
        (ids(0), SamplingParams(), "empty"),
        ({"prompt_token_ids": [5, 99999]}, SamplingParams(), "vocabulary"),
        (ids(256), SamplingParams(max_tokens=1), "max_model_len"),
        (ids(200), SamplingParams(max_tokens=100), "max_tokens"),
        (ids(5), SamplingParams(stop_token_ids=[600]), "stop_token_ids"),
        (ids(5), SamplingParams(logit_bias={-1: 1.0}), "logit_bias"),
        ("text", SamplingParams(), "skip_tokenizer_init"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", prompt, params)
    assert_clean(engine)


def test_request_larger_than_the_pool_is_rejected(tiny_models: dict[str, str]) -> None:
    llm = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=1, num_gpu_blocks_override=4, max_model_len=256)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate(ids(60), SamplingParams(max_tokens=10))
    assert_clean(llm.llm_engine)


def test_finish_reasons_and_stop_token_ids(tiny: LLM) -> None:
    greedy = tiny.generate(ids(7), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 12 and greedy.stop_reason is None
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    out = tiny.generate(ids(7), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == greedy.token_ids[: first + 1]
    # min_tokens holds the stop token back until enough tokens exist.
    out = tiny.generate(ids(7), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[: first + 2]
    assert_clean(tiny.llm_engine)


def test_n_samples_and_seeds_are_reproducible_across_batches(tiny: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    alone = tiny.generate(ids(9), params, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in alone.outputs]
    assert len({tuple(s) for s in samples}) > 1  # the samples differ from each other
    noise = [ids(n, start=30) for n in (3, 40, 17)]
    other = SamplingParams(temperature=0.7, max_tokens=15, ignore_eos=True)
    batch = tiny.generate(noise[:2] + [ids(9)] + noise[2:], [other, other, params, other], use_tqdm=False)
    assert [c.token_ids for c in batch[2].outputs] == samples
    again = tiny.generate(ids(9), params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples
    assert_clean(tiny.llm_engine)


def test_abort_frees_blocks_and_reports_abort(tiny: LLM) -> None:
    engine = tiny.llm_engine
    engine.add_request("a", ids(40), SamplingParams(max_tokens=50, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    engine.add_request("b", ids(20), SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.add_request("c", ids(20), SamplingParams(max_tokens=3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv_cache.num_used_blocks > 0
    engine.abort_request(["a", "b"])
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["a"].finished and outputs["a"].outputs[0].finish_reason == "abort"
    assert {c.finish_reason for c in outputs["b"].outputs} == {"abort"}
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def test_delta_outputs_add_up_to_the_final_output(smol: LLM) -> None:
    engine: LLMEngine = smol.llm_engine
    prompt = "Write a short poem about the moon."
    final = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=30, output_kind=RequestOutputKind.DELTA))
    text, tokens, finish = "", [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            text += output.outputs[0].text
            tokens += output.outputs[0].token_ids
            finish = output.outputs[0].finish_reason
    assert (text, tokens, finish) == (final.text, final.token_ids, final.finish_reason)
    assert_clean(engine)


def test_text_stop_strings_and_chat(smol: LLM) -> None:
    tokenizer = smol.get_tokenizer()
    base = smol.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert base.text == tokenizer.decode(base.token_ids, skip_special_tokens=True)
    word = base.text.split()[1]
    out = smol.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20, stop=[word]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == base.text[: base.text.index(word)]
    reply = smol.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert "Paris" in reply.outputs[0].text and reply.outputs[0].finish_reason == "stop"
    assert reply.outputs[0].token_ids[-1] in smol.llm_engine.eos_token_ids
    assert_clean(smol.llm_engine)


def _rounded(value: object) -> object:
    """`value` with every float (logprobs, cumulative logprobs) rounded to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if hasattr(value, "logprob"):  # a Logprob
        return (round(value.logprob, 4), value.rank, value.decoded_token)
    return value


def test_async_scheduling_matches_sync_for_every_sampling_feature(tiny_models: dict[str, str]) -> None:
    # Seeded sampling and greedy must not depend on the mode. Penalties force synchronous steps while
    # such a request runs (first and short here, so the run switches to overlapping early); min_tokens
    # counts the token in flight; the requests that stop early leave a token in flight to drop.
    features = [
        dict(temperature=0.9, seed=5, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=3),
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, seed=1),
        dict(n=3, temperature=1.0, seed=2),
        dict(temperature=0.0, logprobs=2, prompt_logprobs=1),
        dict(temperature=1.0, seed=3, logprobs=1),
        dict(temperature=0.0, min_tokens=6, stop_token_ids=list(range(0, 512, 3))),
        dict(temperature=0.0, stop_token_ids=list(range(0, 512, 7))),
        dict(temperature=0.7, seed=4, logit_bias={5: 3.0, 9: -100.0}),
    ]
    prompts = [ids(3 + 7 * i, start=20 + i) for i in range(len(features))]
    params = [SamplingParams(**{"max_tokens": 14, "ignore_eos": True, **f}) for f in features]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_model_len=256,
                  max_num_batched_tokens=32, async_scheduling=async_scheduling)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([(o.prompt_logprobs, [(c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)
                                             for c in o.outputs]) for o in outs])
        assert_clean(llm.llm_engine)
    # Tokens, ranks and reasons exactly; logprob values to float32 rounding: a step's batch differs
    # between the modes (a finished request's token in flight), and CPU matmuls round by batch shape.
    assert _rounded(results[0]) == _rounded(results[1])
    stopped = results[1][6][1][0]
    assert len(stopped[0]) >= 6 and all(t % 3 for t in stopped[0][:6])


def test_async_scheduling_keeps_one_step_in_flight(tiny_models: dict[str, str]) -> None:
    llm = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_model_len=256, async_scheduling=True)
    engine = llm.llm_engine
    engine.add_request("a", ids(5), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    assert engine.step() == [] and len(engine._inflight) == 1  # launched, nothing processed yet
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o.outputs[0].token_ids for o in engine.step()]
        assert "a" not in engine.requests or engine.requests["a"].num_pending <= 1
    final = llm.generate(ids(5), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert deltas == [[t] for t in final.token_ids]
    assert not engine._inflight  # nothing left running once every request is done
    assert_clean(engine)
