import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402

SHAPES = [(16, 4, 128), (32, 8, 64)] if torch.cuda.is_available() else [(16, 2, 64), (32, 3, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", SHAPES)
def test_write_kv_skips_negative_slots(device, dtype, block_size, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 8, 37
    # key/value as strided views into one fused projection, as the model produces them.
    kv = torch.randn(num_tokens, 2 * num_kv_heads * head_dim + 5, generator=g).to(device, dtype)
    key = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::5] = -1  # padding tokens
    slots = slots.to(device)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
    expected = cache.clone()
    write_kv_ref(key, value, expected, slots)
    write_kv(key, value, cache, slots)
    assert torch.equal(cache, expected)
