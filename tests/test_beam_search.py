"""Beam search must equal transformers' generate(num_beams=w, do_sample=False, length_penalty=lp): the ranked
hypotheses token for token and their scores within 1e-4 (float32, CPU), on the tiny Llama and Qwen3 with
ignore_eos and with an EOS that ends beams at varied lengths, widths 1..4, several prompts per call; and on
SmolLM2 with a real prompt. The engine is clean after every search."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM
from pagedllm.beam_search import BeamSearchOutput, get_beam_search_score
from pagedllm.sampling_params import BeamSearchParams
from tests.conftest import assert_clean
from tests.reference.models import HFOracle

MAX_TOKENS = 16
LENGTH_PENALTIES = (1.0, 0.5, 2.0)
EOS_ID = 2  # the tiny models' EOS
EOS_BOOST = 4.0


def eos_heavy_copy(src: str, dst: str) -> str:
    """The tiny model with its EOS logit set to about EOS_BOOST on an average hidden state: the random model
    alone almost never ranks EOS high, this one ends beams at all lengths, so finished hypotheses, the
    early stop and their competition with length-capped beams all come into play."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = model.model(ids).last_hidden_state.mean(dim=(0, 1))
        model.lm_head.weight[EOS_ID] = EOS_BOOST * mean / mean.dot(mean)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module", params=["llama-ignore_eos", "llama-eos", "qwen3-ignore_eos", "qwen3-eos"])
def tiny(
    request: pytest.FixtureRequest, tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
) -> tuple[LLM, HFOracle, bool]:
    arch, mode = request.param.split("-")
    ignore_eos = mode == "ignore_eos"
    path = tiny_models[arch] if ignore_eos else eos_heavy_copy(tiny_models[arch], str(tmp_path_factory.mktemp(f"{arch}-eos")))
    oracle = HFOracle(path)
    if ignore_eos:  # EOS is an ordinary token, as with ignore_eos
        oracle.model.generation_config.eos_token_id = None
    return LLM(path, skip_tokenizer_init=True, kv_cache_memory=16 << 20, max_model_len=256), oracle, ignore_eos


def assert_matches(outputs: list[BeamSearchOutput], prompts: list[list[int]], oracle: HFOracle, width: int, lp: float) -> None:
    for prompt, output in zip(prompts, outputs):
        expected = oracle.beam_search(prompt, width, MAX_TOKENS, lp)
        assert [seq.tokens[len(prompt) :] for seq in output.sequences] == [ids for ids, _ in expected]
        scores = [get_beam_search_score(seq, lp) for seq in output.sequences]
        assert scores == pytest.approx([score for _, score in expected], abs=1e-4)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_matches_transformers(tiny: tuple[LLM, HFOracle, bool], width: int) -> None:
    llm, oracle, ignore_eos = tiny
    rng = random.Random(width)
    prompts = [[rng.randrange(3, 512) for _ in range(length)] for length in (1, 7, 20, rng.randint(2, 30))]
    finish_reasons = set()
    for lp in LENGTH_PENALTIES:
        params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=ignore_eos, length_penalty=lp)
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        assert_clean(llm.llm_engine)
        assert [len(o.sequences) for o in outputs] == [width] * len(prompts)
        assert_matches(outputs, prompts, oracle, width, lp)
        for seq in (seq for o in outputs for seq in o.sequences):
            assert (seq.finish_reason == "stop") == (not ignore_eos and seq.tokens[-1] == EOS_ID)
            assert seq.finish_reason == "stop" or len(seq.logprobs) == MAX_TOKENS
            finish_reasons.add(seq.finish_reason)
    assert finish_reasons == ({"length"} if ignore_eos else {"stop", "length"})


def test_smollm2_real_prompt(smollm2: str) -> None:
    llm = LLM(smollm2, kv_cache_memory=64 << 20, max_model_len=256)
    tokenizer = llm.get_tokenizer()
    prompt = "The capital of France is"
    [output] = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    assert_clean(llm.llm_engine)
    prompt_ids = tokenizer(prompt).input_ids
    best_ids, best_score = HFOracle(smollm2).beam_search(prompt_ids, 3, MAX_TOKENS)[0]
    best = output.sequences[0]
    assert best.tokens == prompt_ids + best_ids
    assert get_beam_search_score(best, 1.0) == pytest.approx(best_score, abs=1e-4)
    assert best.text == tokenizer.decode(best_ids, skip_special_tokens=True) and "Paris" in best.text


def test_bad_params(tiny_models: dict[str, str]) -> None:
    for field, kwargs in [("beam_width", dict(beam_width=0, max_tokens=4)), ("max_tokens", dict(beam_width=2, max_tokens=0)),
                          ("length_penalty", dict(beam_width=2, max_tokens=4, length_penalty=float("nan"))),
                          ("temperature", dict(beam_width=2, max_tokens=4, temperature=-1.0))]:
        with pytest.raises(ValueError, match=f"^{field} "):
            BeamSearchParams(**kwargs)  # type: ignore[arg-type]
    llm = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_model_len=64)
    with pytest.raises(ValueError, match="^max_tokens="):
        llm.beam_search({"prompt_token_ids": [5] * 60}, BeamSearchParams(beam_width=2, max_tokens=8))
    with pytest.raises(ValueError, match="^beam_width="):
        llm.beam_search({"prompt_token_ids": [5]}, BeamSearchParams(beam_width=300, max_tokens=8))
    assert_clean(llm.llm_engine)
