"""Tests for the batched sampler against naive per-row references."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import Sampler, SamplingBatch, compute_topk_logprobs

CPU = torch.device("cpu")
VOCAB = 50


def build(
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    vocab: int = VOCAB,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        generators or [None] * n,
        prompts or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        vocab,
        CPU,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kwargs) -> torch.Tensor:
    return Sampler()(logits, build(params, vocab=logits.shape[1], **kwargs)).token_ids


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---- naive references ----------------------------------------------------------------------


def ref_allowed(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens that temperature -> min_p -> top_k -> top_p leave, computed one step at a time."""
    x = row.double() / p.temperature
    allowed = set(range(len(x)))
    probs = torch.softmax(x, 0)
    if p.min_p > 0:
        allowed = {t for t in allowed if probs[t] >= p.min_p * probs.max()}
    if p.top_k > 0:
        kth = sorted((x[t].item() for t in allowed), reverse=True)[min(p.top_k, len(allowed)) - 1]
        allowed = {t for t in allowed if x[t] >= kth}
    if p.top_p < 1.0:
        kept = torch.tensor(sorted(allowed))
        probs = torch.softmax(x[kept], 0)
        order = sorted(range(len(kept)), key=lambda i: -probs[i].item())
        keep, mass = set(), 0.0
        for i in order:
            keep.add(int(kept[i]))
            mass += probs[i].item()
            if mass >= p.top_p:
                break
        allowed = keep
    return allowed


def ref_penalties(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    row = row.clone()
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


# ---- greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_fast_path_builds_nothing() -> None:
    logits = random_logits(8)
    batch = build([SamplingParams(temperature=0.0) for _ in range(8)])
    assert batch.all_greedy and batch.temperature is None and batch.greedy_mask is None
    assert torch.equal(Sampler()(logits, batch).token_ids, logits.argmax(-1))


def test_greedy_ties_pick_first_index_like_torch_argmax() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[0, [3, 7, 9]] = 5.0
    logits[1, [10, 11]] = 1.0
    assert sample(logits, [SamplingParams(temperature=0.0)] * 2).tolist() == [3, 10]
    # Same through the slow path (a no-op bias forces it).
    assert sample(logits, [SamplingParams(temperature=0.0, logit_bias={0: 0.0})] * 2).tolist() == [3, 10]


def test_bf16_logits_greedy() -> None:
    logits = random_logits(4).bfloat16()
    assert torch.equal(sample(logits, [SamplingParams(temperature=0.0)] * 4), logits.float().argmax(-1))


# ---- random sampling ----------------------------------------------------------------------------


def test_temperature_frequencies_match_softmax() -> None:
    torch.manual_seed(1234)
    vocab, rows, temp = 6, 40000, 0.7
    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, 1.2])
    logits = row.expand(rows, vocab).clone()
    tokens = sample(logits, [SamplingParams(temperature=temp)] * rows)
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = torch.softmax(row.double() / temp, 0) * rows
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, chi2  # df = 5; p(chi2 > 25) ~ 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 5},
        {"top_p": 0.6},
        {"min_p": 0.2},
        {"top_k": 8, "top_p": 0.7},
        {"min_p": 0.05, "top_k": 10, "top_p": 0.9, "temperature": 0.5},
        {"top_k": 1},
        {"top_p": 0.01},
    ],
)
def test_filters_never_leave_the_reference_set(kwargs: dict) -> None:
    torch.manual_seed(0)
    rows, draws = 32, 200
    logits = random_logits(rows, seed=5)
    p = SamplingParams(**kwargs)
    allowed = [ref_allowed(logits[i], p) for i in range(rows)]
    # All draws in one batch: row j * rows + i is a copy of row i.
    tokens = sample(logits.repeat(draws, 1), [p] * rows * draws).view(draws, rows)
    for i in range(rows):
        seen = set(tokens[:, i].tolist())
        assert seen <= allowed[i], (i, seen - allowed[i])
        # Nor may the filters drop more than the reference: small allowed sets must show up whole.
        if len(allowed[i]) <= 3:
            assert seen == allowed[i]


def test_filter_mask_equals_reference_exactly() -> None:
    """Sampled with huge noise-free margin per token: every allowed token, and only those, can win."""
    from pagedllm.worker import sampler as mod

    logits = random_logits(6, seed=9)
    params = [
        SamplingParams(top_k=4),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.1),
        SamplingParams(top_k=10, top_p=0.8, temperature=2.0),
        SamplingParams(),
        SamplingParams(min_p=0.3, top_p=0.95, temperature=0.3),
    ]
    batch = build(params)
    filtered = logits.clone()
    if batch.temperature is not None:
        filtered /= batch.temperature
    probs = filtered.softmax(-1)
    filtered.masked_fill_(probs < batch.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    filtered = mod._apply_top_k_top_p(filtered, batch.top_k, batch.top_p)
    for i, p in enumerate(params):
        kept = set(torch.isfinite(filtered[i]).nonzero().flatten().tolist())
        assert kept == ref_allowed(logits[i], p), i


def test_top_k_only_path_matches_reference() -> None:
    from pagedllm.worker import sampler as mod

    logits = random_logits(4, seed=3)
    params = [SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_k=7), SamplingParams(top_k=VOCAB + 5)]
    batch = build(params)
    assert batch.top_p is None and batch.max_top_k == 7
    filtered = mod._apply_top_k(logits.clone(), batch.top_k, batch.max_top_k)
    for i, p in enumerate(params):
        kept = set(torch.isfinite(filtered[i]).nonzero().flatten().tolist())
        assert kept == ref_allowed(logits[i], SamplingParams(top_k=p.top_k if p.top_k < VOCAB else 0))


# ---- logits processing --------------------------------------------------------------------------


def test_penalties_match_naive_reference() -> None:
    """Penalties alone with greedy rows: the argmax must follow the reference processed logits."""
    from pagedllm.worker import sampler as mod

    gen = torch.Generator().manual_seed(0)
    rows = 6
    logits = random_logits(rows, seed=11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 0, 12, 3, 7, 1)]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 9, 0, 15, 2, 6)]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, frequency_penalty=0.7),
        SamplingParams(temperature=0.0, presence_penalty=-1.5),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.0),
        SamplingParams(temperature=0.0),  # no penalties: must be left untouched
        SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=2.0),
    ]
    batch = build(params, prompts=prompts, outputs=outputs)
    processed = logits.clone()
    mod._apply_penalties(processed, batch)
    for i, p in enumerate(params):
        expected = ref_penalties(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(processed[i], expected, rtol=1e-6, atol=1e-6)
    expected_ids = torch.stack([ref_penalties(logits[i], p, prompts[i], outputs[i]) for i, p in enumerate(params)])
    assert torch.equal(Sampler()(logits, batch).token_ids, expected_ids.argmax(-1))


def test_repetition_penalty_matches_transformers() -> None:
    from pagedllm.worker import sampler as mod

    logits = random_logits(1, seed=4)
    prompt, output = [1, 2, 3, 2, 40], [3, 17, 17, 0]
    batch = build([SamplingParams(repetition_penalty=1.7)], prompts=[prompt], outputs=[output])
    ours = logits.clone()
    mod._apply_penalties(ours, batch)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_logit_bias() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 0] = 1.0
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 5.0}),
        SamplingParams(temperature=0.0, logit_bias={0: -100.0, 12: 0.5}),
        SamplingParams(temperature=0.0),
    ]
    assert sample(logits, params).tolist() == [7, 12, 0]
    # Random rows: a -100 bias makes the token unsampleable in practice, +100 forces it.
    torch.manual_seed(0)
    params = [SamplingParams(logit_bias={33: 100.0}), SamplingParams(logit_bias={t: -100.0 for t in range(1, VOCAB)})]
    for _ in range(20):
        assert sample(torch.randn(2, VOCAB), params).tolist() == [33, 0]


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, [2, 5, 9]] = torch.tensor([3.0, 2.0, 1.0])  # 2 = EOS, 5 = user stop id, 9 = next best
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    p.all_stop_token_ids |= {2}  # the engine adds EOS
    assert sample(logits, [p], outputs=[[1, 1]]).tolist() == [9]
    assert sample(logits, [p], outputs=[[1, 1, 1]]).tolist() == [2]
    # ignore_eos: EOS is not a stop so it stays allowed; the user's stop id is still masked.
    q = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2, 5][1:], ignore_eos=True)
    q.all_stop_token_ids |= {2}
    assert sample(logits, [q], outputs=[[]]).tolist() == [2]
    logits[0, 2] = -1.0
    assert sample(logits, [q], outputs=[[]]).tolist() == [9]
    # A random row never samples a masked stop id either.
    torch.manual_seed(0)
    r = SamplingParams(min_tokens=5, stop_token_ids=[5, 9])
    flat = torch.zeros(64, VOCAB)
    tokens = sample(flat, [r] * 64, outputs=[[0]] * 64)
    assert not set(tokens.tolist()) & {5, 9}


# ---- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    logits = random_logits(5, seed=2)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, top_k=5, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, logit_bias={4: 10.0}),
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(top_p=0.3, logprobs=2),
    ]
    raw = logits.clone()
    out = Sampler()(logits, build(params, prompts=[[1, 2]] * 5, outputs=[[3]] * 5))
    assert torch.equal(logits, raw), "the caller's logits must not be modified"
    ref = torch.log_softmax(logits, -1)
    assert out.logprob_token_ids.shape == (5, 4) and out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.logprob_token_ids), atol=1e-6, rtol=0)
    top = ref.topk(3, -1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    for i, t in enumerate(out.token_ids.tolist()):
        order = ref[i].argsort(descending=True).tolist()
        assert out.sampled_ranks[i].item() == order.index(t) + 1


def test_no_logprobs_when_none_asked() -> None:
    out = Sampler()(random_logits(2), build([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.logprob_token_ids is None and out.logprobs is None and out.sampled_ranks is None


def test_compute_topk_logprobs_for_prompt() -> None:
    logits = random_logits(7, seed=8).bfloat16()
    targets = torch.tensor([0, 5, 9, 49, 3, 3, 1])
    ids, logprobs, ranks = compute_topk_logprobs(logits, targets, 0)
    ref = torch.log_softmax(logits.float(), -1)
    assert ids.shape == (7, 1) and logprobs.shape == (7, 1) and ranks.shape == (7,)
    torch.testing.assert_close(logprobs[:, 0], ref[torch.arange(7), targets], atol=1e-6, rtol=0)
    ids, logprobs, ranks = compute_topk_logprobs(logits, targets, 4)
    assert ids.shape == (7, 5) and ids.dtype == torch.int64 and ranks.dtype == torch.int64
    # vLLM's convention: rank = number of tokens at least as likely, so a tied token ranks last of its tie.
    expected_ranks = (ref >= ref[torch.arange(7), targets].unsqueeze(1)).sum(-1)
    assert torch.equal(ranks, expected_ranks)
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert compute_topk_logprobs(tied, torch.tensor([1]), 2)[2].tolist() == [2]
    assert compute_topk_logprobs(tied, torch.tensor([3]), 2)[2].tolist() == [4]


# ---- seeds and mixed batches --------------------------------------------------------------------


def seeded_run(position: int, others: list[SamplingParams], steps: int, seed: int = 42) -> list[int]:
    """Samples the seeded row for several steps, placed at `position` among `others`."""
    params = list(others)
    gens: list[torch.Generator | None] = [None] * len(others)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    params.insert(position, seeded)
    gens.insert(position, torch.Generator().manual_seed(seed))
    tokens = []
    for step in range(steps):
        logits = random_logits(len(params), seed=100 + step)
        logits[position] = random_logits(1, seed=1000 + step)[0]
        torch.manual_seed(step * 7 + len(params))  # default-generator state differs between runs
        tokens.append(sample(logits, params, generators=gens)[position].item())
    return tokens


def test_seeded_row_is_independent_of_batch() -> None:
    alone = seeded_run(0, [], steps=12)
    assert len(set(alone)) > 1
    assert seeded_run(0, [], steps=12) == alone
    assert seeded_run(2, [SamplingParams()] * 4, steps=12) == alone
    assert seeded_run(1, [SamplingParams(temperature=0.0), SamplingParams(top_k=3, min_p=0.1)], steps=12) == alone
    mixed = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=0.4, logprobs=2),
        SamplingParams(temperature=1.5, frequency_penalty=0.5),
    ]
    assert seeded_run(3, mixed, steps=12) == alone
    assert seeded_run(0, mixed * 3, steps=12) == alone
    assert seeded_run(0, [], steps=12, seed=43) != alone


def test_two_seeded_rows_same_seed_give_same_tokens() -> None:
    logits = random_logits(1).expand(2, VOCAB).clone()
    params = [SamplingParams(seed=7), SamplingParams(seed=7)]
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    for _ in range(5):
        a, b = sample(logits, params, generators=gens).tolist()
        assert a == b


def test_mixed_greedy_and_random_rows() -> None:
    torch.manual_seed(3)
    logits = random_logits(6, seed=6)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, seed=5),
        SamplingParams(temperature=0.7, top_k=2),
        SamplingParams(temperature=1e-6),
        SamplingParams(temperature=2.0, min_p=0.5),
    ]
    gens = [None, None, torch.Generator().manual_seed(5), None, None, None]
    batch = build(params, generators=gens)
    assert batch.greedy_mask is not None and batch.any_random and 2 not in batch.generators
    draws = torch.stack([Sampler()(logits, batch).token_ids for _ in range(20)])
    # More draws in one batch: the same six rows repeated.
    big = build(params * 50, generators=gens * 50)
    draws = torch.cat([draws, Sampler()(logits.repeat(50, 1), big).token_ids.view(50, 6)])
    argmax = logits.argmax(-1)
    for i in (0, 2, 4):
        assert (draws[:, i] == argmax[i]).all()
    assert len(draws[:, 1].unique()) > 3
    assert set(draws[:, 3].tolist()) == set(logits[3].topk(2).indices.tolist())
    assert set(draws[:, 5].tolist()) <= ref_allowed(logits[5], params[5])


def test_padded_vocab_columns_never_sampled() -> None:
    logits = torch.zeros(2, VOCAB + 6)
    logits[:, VOCAB:] = 50.0
    batch = build([SamplingParams(temperature=0.0), SamplingParams()])
    assert (Sampler()(logits, batch).token_ids < VOCAB).all()
