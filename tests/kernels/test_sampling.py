"""The sampling kernels (filter thresholds, Gumbel-max draw), alone and as the sampler's CUDA path (run on CPU
under the interpreter)."""

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.sampling import filter_thresholds, greedy_argmax, gumbel_max_sample  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402
from pagedllm.worker import sampler as sampler_mod  # noqa: E402
from pagedllm.worker.sampler import Sampler, SamplingBatch  # noqa: E402

ON_CUDA = torch.cuda.is_available()
# The interpreter runs each row as a program, ~20-50 ms each: statistical checks use fewer rows on CPU.
STAT_ROWS = 4000 if ON_CUDA else 300


def _full(n: int, device: torch.device, value: float) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=device)


def _seeds(n: int, device: torch.device, base: int) -> torch.Tensor:
    return torch.arange(base, base + n, dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(2, 3000), (5, 100)])
def test_greedy_rows_are_argmax(device, dtype, rows, vocab):
    """Noise 0: the argmax of the logits, ties to the lowest index, also across slices of a strided row."""
    wide = torch.randn(rows, vocab + 7, generator=torch.Generator().manual_seed(vocab)).to(device, dtype)
    wide[0, 5] = wide[0, vocab - 2] = wide[0, :vocab].max() + 1  # a tie across the row's first and last slice
    logits = wide[:, :vocab]  # the padded LM-head columns are never sampled
    ids = gumbel_max_sample(logits, _full(rows, device, 0.37), _full(rows, device, 0.0), _seeds(rows, device, 1))
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    assert ids[0].item() == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 5000), (3, 2100)])
def test_greedy_argmax_is_torch_argmax(device, dtype, rows, vocab):
    """The all-greedy kernel: torch.argmax of each row, ties to the lowest index (in one slice and across
    slices), -inf entries and a row of -inf only (index 0, as torch) included."""
    wide = torch.randn(rows, vocab + 5, generator=torch.Generator().manual_seed(rows)).to(device, dtype)
    logits = wide[:, :vocab]
    top = logits[0].max() + 1
    logits[0, 9] = logits[0, 11] = logits[0, vocab - 1] = top
    logits[-1, 20 : vocab // 2] = float("-inf")
    if rows > 2:
        logits[1] = float("-inf")
    ids = greedy_argmax(logits)
    assert ids.dtype == torch.int64
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    assert ids[0].item() == 9


def test_seeded_draws_repeat_and_follow_softmax(device):
    """Random rows: the same seeds draw the same ids, and the draws follow softmax(logits / T)."""
    rows, vocab, temperature = STAT_ROWS, 1100, 0.7
    logits = torch.full((vocab,), -12.0)
    hot = torch.tensor([3, 300, 700, 1099])  # in different quarters of a block and in both blocks
    logits[hot] = torch.tensor([1.0, 0.5, 0.0, -1.0])
    batch = logits.to(device, torch.bfloat16).expand(rows, vocab)
    inv_t, noise = _full(rows, device, 1 / temperature), _full(rows, device, 1.0)
    ids = gumbel_max_sample(batch, inv_t, noise, _seeds(rows, device, 7))
    assert torch.equal(ids[:16], gumbel_max_sample(batch[:16], inv_t[:16], noise[:16], _seeds(16, device, 7)))
    assert not torch.equal(ids[:16], gumbel_max_sample(batch[:16], inv_t[:16], noise[:16], _seeds(16, device, 7 + rows)))
    expected = torch.softmax(logits.bfloat16().double() / temperature, dim=0)
    counts = torch.bincount(ids.cpu(), minlength=vocab).double() / rows
    sigma = (expected[hot] * (1 - expected[hot]) / rows).sqrt()
    assert ((counts[hot] - expected[hot]).abs() < 4 * sigma + 1e-3).all(), (counts[hot], expected[hot])
    assert counts[hot].sum() > 0.99


def test_equal_logits_in_each_quarter_are_drawn_equally(device):
    """One allowed column in each quarter of a block (each takes another Philox output): drawn about equally often."""
    rows, vocab = STAT_ROWS, 1024
    hot = torch.tensor([5, 300, 600, 900])
    logits = torch.full((rows, vocab), float("-inf"))
    logits[:, hot] = 0.0
    ids = gumbel_max_sample(logits.to(device), _full(rows, device, 1.0), _full(rows, device, 1.0), _seeds(rows, device, 3))
    counts = torch.bincount(ids.cpu(), minlength=vocab).double() / rows
    sigma = (0.25 * 0.75 / rows) ** 0.5
    assert counts[hot].sum() == 1.0 and ((counts[hot] - 0.25).abs() < 4 * sigma).all(), counts[hot]


def _batch(params: list[SamplingParams], vocab: int, device: torch.device, generators=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, generators or [None] * n, [[1]] * n, [[]] * n, vocab, device)


def test_sampler_uses_kernel_for_temperature_only_batches(device):
    """Greedy rows stay argmax beside random ones; no thresholds without min_p/top_k/top_p;
    logit_bias and min_tokens edits are applied before the kernel draws."""
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)).to(device)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8), SamplingParams(temperature=1e-6),
              SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams()]
    batch = _batch(params, vocab, device)
    assert batch.inv_temperature is not None and batch.kernel_filters is None
    sampler = Sampler(use_kernel=True)
    draws = torch.stack([sampler(logits, batch).token_ids for _ in range(8)]).cpu()
    argmax = logits.argmax(-1).cpu()
    for row in (0, 2, 4):
        assert (draws[:, row] == argmax[row]).all()
    assert len(draws[:, 5].unique()) > 1
    assert _batch([SamplingParams(top_p=0.9)], vocab, device).kernel_filters is not None
    biased = [SamplingParams(temperature=0.0, logit_bias={7: 100.0}), SamplingParams(temperature=0.5, logit_bias={9: 100.0})]
    assert sampler(logits[:2], _batch(biased, vocab, device)).token_ids.tolist() == [7, 9]
    eos = int(argmax[0])
    stopped = [SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[eos]), SamplingParams(temperature=0.7)]
    assert sampler(logits[:2], _batch(stopped, vocab, device)).token_ids[0].item() != eos


@pytest.mark.parametrize("seeded", [SamplingParams(seed=11), SamplingParams(seed=11, top_k=20, top_p=0.9, min_p=0.02)])
def test_seeded_rows_ignore_the_batch_around_them(device, seeded):
    """A seeded request draws the same tokens alone or among other rows, filtered or not (its seed comes from
    its generator, its threshold from its own row)."""
    vocab = 200
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, vocab, generator=gen).to(device, torch.bfloat16)
    neighbours = [SamplingParams(top_p=0.5), SamplingParams(temperature=0.0), SamplingParams(top_k=3, min_p=0.1)]

    def run(others: int) -> list[int]:
        generator = torch.Generator(device=device).manual_seed(11)
        batch = _batch(neighbours[:others] + [seeded], vocab, device, [None] * others + [generator])
        rows = torch.cat([logits[1 : others + 1], logits[:1]])
        return [Sampler(use_kernel=True)(rows, batch).token_ids[-1].item() for _ in range(5)]

    alone = run(0)
    assert len(set(alone)) > 1
    assert run(3) == alone and run(0) == alone


# ---- filters: min_p -> top_k -> top_p as one threshold per row ---------------------------------

# One batch of rows with different filters, and rows with none.
FILTERED = [
    SamplingParams(top_k=5), SamplingParams(top_k=1), SamplingParams(top_p=0.6),
    SamplingParams(top_p=0.05, temperature=0.5), SamplingParams(min_p=0.2), SamplingParams(min_p=0.02, temperature=0.4),
    SamplingParams(top_k=40, top_p=0.8, min_p=0.01, temperature=0.7), SamplingParams(top_k=300, top_p=0.99, temperature=1.5),
    SamplingParams(top_k=100_000), SamplingParams(temperature=1.3), SamplingParams(temperature=0.0, top_k=3),
]
UNFILTERED = [8, 9, 10]  # top_k >= vocab, temperature alone, a greedy row


def _distinct_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows without ties: at a tied threshold the kernel keeps the whole group, torch's sort an arbitrary part."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(rows, vocab, generator=gen) * 3
    # bf16: distinct bit patterns, magnitudes in [2**-7, 8) of either sign (0x3C00 is 2**-7; - 0x8000 sets the sign)
    pool = torch.cat([0x3C00 + torch.arange(0x500), 0x3C00 + torch.arange(0x500) - 0x8000]).to(torch.int16)
    picks = torch.stack([torch.randperm(len(pool), generator=gen)[:vocab] for _ in range(rows)])
    return pool[picks].view(torch.bfloat16)


def _torch_kept(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] bool: the tokens the torch path's filters keep, after its logit edits."""
    return torch.isfinite(sampler_mod._filtered(sampler_mod._edited(logits, batch), batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thresholds_keep_the_torch_paths_sets(device, dtype):
    """Every row keeps exactly the torch path's set, each row with its own filters, on strided rows
    of a vocabulary that is not a multiple of the tile."""
    vocab = 1500
    logits = _distinct_logits(len(FILTERED), vocab + 5, dtype, seed=3)[:, :vocab]
    batch = _batch(FILTERED, vocab, torch.device("cpu"))
    expected = _torch_kept(logits, batch)
    batch = _batch(FILTERED, vocab, device)
    thresholds = filter_thresholds(logits.to(device), batch.inv_temperature, *batch.kernel_filters).cpu()
    kept = logits.float() >= thresholds[:, None]
    for row in range(len(FILTERED)):
        assert torch.equal(kept[row], expected[row]), (row, kept[row].sum().item(), expected[row].sum().item())
    assert thresholds[UNFILTERED].eq(float("-inf")).all()
    assert 1 < expected[0].sum() < vocab and expected[1].sum() == 1  # the filters did cut


def test_ties_with_a_threshold_are_all_kept(device):
    """top_k = 2 and a top_p ending in a tied group: the kernel keeps all of the group (the torch path's
    sort keeps an arbitrary part of it)."""
    logits = torch.tensor([[1.0, 3.0, 5.0, 3.0, 0.0, 3.0]] * 2, device=device)
    top_k = torch.tensor([2, 0], dtype=torch.int32, device=device)
    # softmax: 0.70 for the 5, 0.09 for each 3: the mass reaches 0.75 inside the group of 3s.
    top_p = torch.tensor([1.0, 0.75], device=device)
    thresholds = filter_thresholds(logits, _full(2, device, 1.0), top_k, top_p, _full(2, device, 0.0))
    assert thresholds.tolist() == [3.0, 3.0]


def test_draws_follow_the_kept_distribution(device):
    """A row through min_p, top_k and top_p: draws only its kept tokens, in proportion to softmax(l / T) over them."""
    rows, vocab, temperature = STAT_ROWS, 64, 0.8
    row = torch.linspace(-4.0, -2.0, vocab)
    hot = torch.tensor([3, 17, 40, 50, 61])
    # min_p 0.05 leaves the five hot tokens, top_k 4 the first four and top_p 0.9 the first three of them.
    row[hot] = torch.tensor([2.0, 1.6, 1.2, 0.5, 0.4])
    row = row.bfloat16()
    params = SamplingParams(temperature=temperature, min_p=0.05, top_k=4, top_p=0.9)
    kept = _torch_kept(row.view(1, -1), _batch([params], vocab, torch.device("cpu")))[0]
    assert kept.nonzero().view(-1).tolist() == sorted(hot[:3].tolist())
    batch = _batch([params], vocab, device)
    # One row's threshold for all the draws: a row's threshold depends on its logits alone.
    threshold = filter_thresholds(row.view(1, -1).to(device), batch.inv_temperature, *batch.kernel_filters)
    logits = row.to(device).expand(rows, vocab)
    inv_t, noise = _full(rows, device, 1 / temperature), _full(rows, device, 1.0)
    ids = gumbel_max_sample(logits, inv_t, noise, _seeds(rows, device, 5), threshold.repeat(rows)).cpu()
    counts = torch.bincount(ids, minlength=vocab).double() / rows
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[kept] = torch.softmax(row[kept].double() / temperature, dim=0)
    assert counts[~kept].sum() == 0
    sigma = (expected[kept] * (1 - expected[kept]) / rows).sqrt()
    assert ((counts[kept] - expected[kept]).abs() < 4 * sigma).all(), (counts[kept], expected[kept])


def test_sampler_kernel_path_filters_after_logit_edits(device, monkeypatch):
    """Sampler(use_kernel=True) with min_p/top_k/top_p and logit_bias, min_tokens, penalties: the draws stay
    in the torch path's kept sets of the edited logits; a greedy row stays the argmax of its edited logits."""
    monkeypatch.setattr(sampler_mod, "_MIN_ROWS_FOR_FLOAT32_FILTERS", 1)  # these 5 rows take the kernels too
    vocab = 300
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4)) * 2
    best = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, top_k=3, logit_bias={11: 100.0}),
        SamplingParams(top_k=1, logit_bias={7: 100.0}),
        SamplingParams(top_p=0.6, min_tokens=1, stop_token_ids=[best[2]]),
        SamplingParams(min_p=0.2, temperature=0.7, frequency_penalty=1.0),
        SamplingParams(top_k=5, top_p=0.9, temperature=1.5, presence_penalty=2.0),
    ]
    outputs = [[], [], [], [best[3]] * 2, [best[4]]]

    def build(on: torch.device) -> SamplingBatch:
        return SamplingBatch.build(params, [None] * 5, [[1]] * 5, outputs, vocab, on)

    kept = _torch_kept(logits, build(torch.device("cpu")))
    assert not kept[2, best[2]] and not kept[3, best[3]]  # the edits matter
    sampler, batch = Sampler(use_kernel=True), build(device)
    draws = torch.stack([sampler(logits.to(device), batch).token_ids for _ in range(6)]).cpu()
    assert (draws[:, 0] == 11).all() and (draws[:, 1] == 7).all()
    for row in range(2, 5):
        assert kept[row, draws[:, row]].all(), row


def test_sampler_small_edited_filtered_batches_take_the_torch_path(monkeypatch):
    """Below _MIN_ROWS_FOR_FLOAT32_FILTERS rows, filters on edited (float32) logits are sorted in torch."""
    def no_kernel(*args):
        raise AssertionError("kernel path taken")

    monkeypatch.setattr(sampler_mod, "_kernel_draw", no_kernel)
    params = [SamplingParams(top_p=0.9, repetition_penalty=1.2)] * 2
    batch = SamplingBatch.build(params, [None] * 2, [[1]] * 2, [[2]] * 2, 50, torch.device("cpu"))
    assert Sampler(use_kernel=True)(torch.randn(2, 50), batch).token_ids.shape == (2,)
