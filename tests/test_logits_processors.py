"""Logits processors (pagedllm/logits_process/), float32 on CPU with a tiny random Llama: a custom processor on vLLM
v1's batch interface, banning per request the tokens its extra_args name, changes exactly the rows that ask (the others
keep the tokens of a run without it) while requests join and leave a 3-sequence batch with chunked prefill; its
update_state hears of every add, removal and move, and at every step its rows are the step's rows with their output
so far (the token in flight included, with async scheduling; each draft's row with speculative decoding);
allowed_token_ids; bad words (async scheduling gives the same tokens as synchronous steps); loading by name; the row
diff on random batches; params checks."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.logits_process import (
    BatchUpdate, LogitsProcessor, LogitsProcessors, MoveDirectionality, diff_rows, process_dict_updates,
    resolve_logits_processors, validate_params,
)
from pagedllm.entrypoints.openai.protocol import CompletionRequest
from tests.conftest import assert_clean

# Three sequences at a time and 40-token steps: requests join and leave the batch all the time, prompts are chunked.
ARGS = dict(skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=8 << 20, max_num_seqs=3,
            max_num_batched_tokens=40)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


class BanTokens(LogitsProcessor):
    """Masks, in the rows whose request passes extra_args={"ban": [token ids]}, those tokens. Keeps each row's tag
    (extra_args["tag"]) and output list, for the tests to check the bookkeeping."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.config, self.device = vllm_config, device
        self.bans: dict[int, list[int]] = {}
        self.tags: dict[int, str] = {}
        self.outputs: dict[int, list[int]] = {}
        self.updates: list[BatchUpdate | None] = []

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        ban = (sampling_params.extra_args or {}).get("ban")
        if ban is not None and (not isinstance(ban, list) or not all(isinstance(t, int) for t in ban)):
            raise ValueError("extra_args.ban must be a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.updates.append(batch_update)
        process_dict_updates(self.bans, batch_update, lambda p, _, __: (p.extra_args or {}).get("ban"))
        process_dict_updates(self.tags, batch_update, lambda p, _, __: (p.extra_args or {}).get("tag"))
        process_dict_updates(self.outputs, batch_update, lambda p, _, out: out)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, ban in self.bans.items():
            logits[row, ban] = float("-inf")
        return logits


class Invariant(BanTokens):
    """The same, claiming (wrongly, for the test's sake) to leave argmax alone: it must then skip all-greedy steps."""

    def is_argmax_invariant(self) -> bool:
        return True


def _workload(n: int = 9, seed: int = 0) -> tuple[list[dict[str, Any]], list[int]]:
    """Prompts (most with a repeated stretch, for prompt lookup) and max_tokens of different lengths."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        head = [rng.randrange(3, 500) for _ in range(rng.randint(3, 30))]
        prompts.append({"prompt_token_ids": head + head[: rng.randint(0, len(head))] if i % 3 else head})
    return prompts, [rng.randint(4, 24) for _ in range(n)]


def _generate(llm: LLM, prompts: list[dict[str, Any]], params: list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _params(max_tokens: list[int], seeded: set[int] = frozenset(), **per_row: dict[int, Any]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.8 if i in seeded else 0, seed=i if i in seeded else None, max_tokens=m,
                           ignore_eos=True, **{name: value[i] for name, value in per_row.items() if i in value})
            for i, m in enumerate(max_tokens)]


def _check_rows_each_step(llm: LLM, processor: BanTokens) -> dict[str, int]:
    """Wraps the engine's processors: at every apply, the processor's rows must be the step's rows (by tag) and each
    row's output list the request's history at that row. Returns counts of the steps, tokens in flight and draft rows
    seen."""
    procs = llm.llm_engine.runner.logits_processors
    assert isinstance(procs, LogitsProcessors)
    prepare, apply = procs.prepare, procs.apply
    current: list[Any] = []
    checked = {"steps": 0, "in_flight": 0, "drafts": 0}

    def recording_prepare(requests: list[Any], pending: Any = None, builtin: bool | None = None) -> bool:
        current[:] = requests
        return prepare(requests, pending, builtin)

    def checking_apply(logits: torch.Tensor, any_random: bool) -> torch.Tensor:
        assert logits.shape[0] == len(current)
        tags = {i: (r.params.extra_args or {}).get("tag") for i, r in enumerate(current)}
        assert processor.tags == {i: tag for i, tag in tags.items() if tag is not None}
        j, previous = 0, None
        for i, r in enumerate(current):
            j = j + 1 if r is previous else 0
            previous = r
            out = processor.outputs[i]
            assert out[: len(r.output_token_ids)] == r.output_token_ids
            assert len(out) == len(r.output_token_ids) + r.num_pending + j
            if j:
                assert out[-j:] == r.spec_token_ids[:j]
            checked["in_flight"] += r.num_pending
            checked["drafts"] += j > 0
        checked["steps"] += 1
        return apply(logits, any_random)

    procs.prepare, procs.apply = recording_prepare, checking_apply  # type: ignore[method-assign]
    return checked


@pytest.fixture(scope="module")
def baseline(tiny_models: dict[str, str]) -> tuple[list[dict[str, Any]], list[int], list[list[int]]]:
    """The workload and its tokens without any processor (two seeded random rows among greedy ones)."""
    prompts, max_tokens = _workload()
    llm = LLM(tiny_models["llama"], **ARGS)
    assert llm.llm_engine.runner.logits_processors is not None
    return prompts, max_tokens, _generate(llm, prompts, _params(max_tokens, seeded={2, 5}))


@pytest.mark.parametrize("mode", ["sync", "async", "ngram"])
def test_custom_processor_changes_only_the_rows_that_ask(tiny_models: dict[str, str], baseline: Any, mode: str) -> None:
    prompts, max_tokens, expected = baseline
    extra = {"async": dict(async_scheduling=True), "ngram": dict(speculative_config=NGRAM)}.get(mode, {})
    # By class, and by name (the --logits-processors form) for the async run.
    spec: Any = f"{__name__}:BanTokens" if mode == "async" else [BanTokens]
    llm = LLM(tiny_models["llama"], logits_processors=spec, **ARGS, **extra)
    (processor,) = llm.llm_engine.runner.logits_processors.custom
    assert isinstance(processor, BanTokens) and processor.config is llm.llm_engine.config
    checked = _check_rows_each_step(llm, processor)
    seeded = set() if mode == "ngram" else {2, 5}  # speculation keeps sampled rows' law, not their tokens
    asking = {1, 3, 4, 5, 7}
    # Each asking row bans its own first tokens of the run without the processor, and a few more.
    bans = {i: sorted({*expected[i][:2], 7 * i + 3}) for i in asking}
    extra_args = {i: {"tag": str(i), **({"ban": bans[i]} if i in asking else {})} for i in range(len(prompts))}
    got = _generate(llm, prompts, _params(max_tokens, seeded=seeded, extra_args=extra_args))
    for i, tokens in enumerate(got):
        if i in asking:
            assert not set(tokens) & set(bans[i]) and tokens != expected[i], i
        elif i not in {2, 5} or mode != "ngram":
            assert tokens == expected[i], i
    assert checked["steps"] > 20
    assert (checked["in_flight"] > 0) == (mode == "async") and (checked["drafts"] > 0) == (mode == "ngram")
    updates = processor.updates
    assert None in updates  # steady steps: same rows, nothing to tell
    changes = [u for u in updates if u is not None]
    assert any(u.removed for u in changes) and any(u.moved for u in changes)
    added_tags = {u_added[1].extra_args["tag"] for u in changes for u_added in u.added}
    assert added_tags == {str(i) for i in range(len(prompts))}
    if mode == "ngram":
        stats = llm.llm_engine.spec.stats
        assert stats.num_draft_tokens > 0
    # Without any row asking, the processor changes nothing.
    again = _generate(llm, prompts, _params(max_tokens, seeded=seeded))
    assert all(a == e for i, (a, e) in enumerate(zip(again, expected)) if seeded or i not in {2, 5})


def test_argmax_invariant_processor_skips_greedy_steps(tiny_models: dict[str, str], baseline: Any) -> None:
    prompts, max_tokens, expected = baseline
    llm = LLM(tiny_models["llama"], logits_processors=[Invariant], **ARGS)
    ban = {i: {"ban": expected[i][:1]} for i in range(len(prompts))}
    greedy = _generate(llm, prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, extra_args=ban[i])
                                      for i, m in enumerate(max_tokens)])
    assert all(g == e for g, e, i in zip(greedy, expected, range(len(prompts))) if i not in {2, 5})
    sampled = _generate(llm, prompts, _params(max_tokens, seeded=set(range(len(prompts))), extra_args=ban))
    assert all(not set(tokens) & set(ban[i]["ban"]) for i, tokens in enumerate(sampled))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_allowed_token_ids(tiny_models: dict[str, str], baseline: Any, async_scheduling: bool) -> None:
    prompts, max_tokens, expected = baseline
    llm = LLM(tiny_models["llama"], async_scheduling=async_scheduling, **ARGS)
    allowed = {1: list(range(100, 140)), 2: [5, 9, 300], 6: [42]}
    got = _generate(llm, prompts, _params(max_tokens, seeded={2, 5}, allowed_token_ids=allowed))
    for i, tokens in enumerate(got):
        if i in allowed:
            assert set(tokens) <= set(allowed[i]), i
        else:
            assert tokens == expected[i], i
    assert got[6] == [42] * max_tokens[6]


def test_bad_words(tiny_models: dict[str, str], baseline: Any) -> None:
    """A word of two tokens never appears, a one-token word never either; with async scheduling the processor sees
    the token in flight, so the tokens are the synchronous ones."""
    prompts, max_tokens, expected = baseline
    rows = [i for i, tokens in enumerate(expected) if len(tokens) >= 6 and i not in {2, 5}][:4]
    assert len(rows) >= 3
    # A pair the free run writes, and a later single token.
    words = {i: [expected[i][1:3], [expected[i][4]]] for i in rows}
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(tiny_models["llama"], async_scheduling=async_scheduling, **ARGS)
        got = _generate(llm, prompts, _params(max_tokens, seeded={2, 5}, bad_words_token_ids=words))
        for i, tokens in enumerate(got):
            if i not in words:
                assert tokens == expected[i], i
                continue
            (a, b), (c,) = words[i]
            assert c not in tokens and not any(x == a and y == b for x, y in zip(tokens, tokens[1:])), i
            assert tokens != expected[i]
        runs.append(got)
    assert runs[0] == runs[1]


def test_bad_words_tokenization_and_checks() -> None:
    class Tokenizer:  # one id per character, a space its own id (0)
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            assert not add_special_tokens
            return [0 if ch == " " else ord(ch) - 96 for ch in text]

    params = SamplingParams(bad_words=["ab", " c"])
    with pytest.raises(ValueError, match="bad_words"):
        validate_params(None, params)  # text words untokenized: the engine must tokenize them first
    params.update_from_tokenizer(Tokenizer())
    params.update_from_tokenizer(Tokenizer())  # idempotent
    assert params.all_bad_words_token_ids == [[1, 2], [0, 1, 2], [3], [0, 3]]
    validate_params([BanTokens], params)
    clone = params.clone()
    assert clone.all_bad_words_token_ids == params.all_bad_words_token_ids
    with pytest.raises(ValueError, match="extra_args.ban"):
        validate_params([BanTokens], SamplingParams(extra_args={"ban": "x"}))
    for bad in (dict(allowed_token_ids=[]), dict(allowed_token_ids=[1.5]), dict(bad_words=[""]),
                dict(bad_words_token_ids=[[]]), dict(bad_words_token_ids=[[1, "a"]])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    for field, kwargs in (("allowed_token_ids", dict(allowed_token_ids=[3, 512])),
                          ("bad_words", dict(bad_words_token_ids=[[3, 600]]))):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs).verify_token_ids(512)


def test_loading_by_name_and_errors(tiny_models: dict[str, str]) -> None:
    assert resolve_logits_processors(None) is None
    assert resolve_logits_processors(f"{__name__}.BanTokens, {__name__}:Invariant") == [
        BanTokens, Invariant]
    assert resolve_logits_processors([BanTokens, f"{__name__}:Invariant"]) == [BanTokens, Invariant]
    for bad, match in (("no_such_module_xyz:Cls", "cannot import"), (f"{__name__}:Nope", "no attribute"),
                       ("nodots", "module:Class"), ([int], "must be a class with")):
        with pytest.raises(ValueError, match=match):
            resolve_logits_processors(bad)
    with pytest.raises(ValueError, match="cannot import"):
        LLM(tiny_models["llama"], logits_processors=["no_such_module_xyz:Cls"], **ARGS)


def test_diff_rows_on_random_batches() -> None:
    """Replaying removed, added, moved on a {index: row} dict, as a processor does, gives the new rows, with
    UNIDIRECTIONAL moves into empty indices only; same rows give nothing."""
    rng = random.Random(0)
    for _ in range(3000):
        pool = [object() for _ in range(10)]
        old = rng.sample(pool, rng.randint(0, 8))
        new = rng.sample(pool, rng.randint(0, 8)) if rng.random() < 0.7 else old[1:] + pool[8:9]
        removed, added, moved = diff_rows(old, new)
        state = dict(enumerate(old))
        for i in removed:
            del state[i]
        for i, k in added:
            assert i < max(len(old), len(new))
            state[i] = new[k]
        for a, b, direction in moved:
            at_a, at_b = state.pop(a), state.pop(b, None)
            assert (at_b is None) == (direction is MoveDirectionality.UNIDIRECTIONAL)
            state[b] = at_a
            if at_b is not None:
                state[a] = at_b
        assert state == dict(enumerate(new))
    rows = [object() for _ in range(4)]
    assert diff_rows(rows, list(rows)) == ([], [], [])
    # One row leaving the middle: the rows after it shift down by moves, not re-adds.
    assert diff_rows(rows, [rows[0], rows[2], rows[3]]) == (
        [1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL), (3, 2, MoveDirectionality.UNIDIRECTIONAL)])


def test_server_request_fields() -> None:
    from pagedllm.entrypoints.openai.serving_base import OpenAIServing

    serving = object.__new__(OpenAIServing)  # sampling_params reads nothing of the server
    request = CompletionRequest(prompt="hi", allowed_token_ids=[1, 2], bad_words=["x"],
                                vllm_xargs={"ban": [3, 4], "mode": "strict"}, kv_transfer_params={"do_remote_decode": True})
    params = serving.sampling_params(request, 8, None)
    assert params.allowed_token_ids == [1, 2] and params.bad_words == ["x"]
    assert params.extra_args == {"ban": [3, 4], "mode": "strict", "kv_transfer_params": {"do_remote_decode": True}}
    assert serving.sampling_params(CompletionRequest(prompt="hi"), 8, None).extra_args is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cuda_graphs_on_and_off_give_the_same_tokens(tiny_models: dict[str, str], async_scheduling: bool) -> None:
    """On the GPU: a custom processor, allowed_token_ids, bad words, min_tokens and logit_bias give the same greedy
    tokens with the decode graphs (and piecewise graphs) as eagerly, rows with and without them in one batch."""
    prompts, max_tokens = _workload(12, seed=3)
    per_row = dict(extra_args={i: {"ban": [7 * i + 3, 11 * i + 5]} for i in (0, 3, 4, 8)},
                   allowed_token_ids={1: list(range(100, 160)), 6: [9, 300, 301]},
                   bad_words_token_ids={2: [[40, 41], [42]], 9: [[5]]},
                   min_tokens={5: 10}, logit_bias={7: {17: 5.0, 23: -3.0}})
    runs = []
    for eager in (True, False):
        llm = LLM(tiny_models["llama"], logits_processors=[BanTokens], dtype="float32", enforce_eager=eager,
                  async_scheduling=async_scheduling, **{**ARGS, "max_num_seqs": 8})
        assert (llm.llm_engine.runner.graph_runner is None) == eager
        runs.append(_generate(llm, prompts, _params(max_tokens, **per_row)))
    assert runs[0] == runs[1]
