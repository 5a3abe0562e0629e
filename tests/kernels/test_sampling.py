"""The Gumbel-max sampling kernel, alone and as the sampler's CUDA path (run on CPU under the interpreter)."""

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.sampling import gumbel_max_sample  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402
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
    """Greedy rows stay argmax beside random ones; min_p/top_k/top_p batches keep the torch path;
    logit_bias and min_tokens edits are applied before the kernel draws."""
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)).to(device)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8), SamplingParams(temperature=1e-6),
              SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams()]
    batch = _batch(params, vocab, device)
    assert batch.inv_temperature is not None
    sampler = Sampler(use_kernel=True)
    draws = torch.stack([sampler(logits, batch).token_ids for _ in range(8)]).cpu()
    argmax = logits.argmax(-1).cpu()
    for row in (0, 2, 4):
        assert (draws[:, row] == argmax[row]).all()
    assert len(draws[:, 5].unique()) > 1
    assert _batch([SamplingParams(top_p=0.9)], vocab, device).inv_temperature is None
    biased = [SamplingParams(temperature=0.0, logit_bias={7: 100.0}), SamplingParams(temperature=0.5, logit_bias={9: 100.0})]
    assert sampler(logits[:2], _batch(biased, vocab, device)).token_ids.tolist() == [7, 9]
    eos = int(argmax[0])
    stopped = [SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[eos]), SamplingParams(temperature=0.7)]
    assert sampler(logits[:2], _batch(stopped, vocab, device)).token_ids[0].item() != eos


def test_seeded_rows_ignore_the_batch_around_them(device):
    """A seeded request draws the same tokens alone or among other rows (its seed comes from its generator)."""
    vocab = 200
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(2)).to(device)

    def run(others: int) -> list[int]:
        generator = torch.Generator(device=device).manual_seed(11)
        params = [SamplingParams()] * others + [SamplingParams(seed=11)]
        batch = _batch(params, vocab, device, [None] * others + [generator])
        rows = logits.expand(others + 1, vocab).contiguous()
        return [Sampler(use_kernel=True)(rows, batch).token_ids[-1].item() for _ in range(6)]

    alone = run(0)
    assert len(set(alone)) > 1
    assert run(3) == alone and run(0) == alone
