import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.backend import KV_FP8, quantize_fp8  # noqa: E402
from pagedllm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from pagedllm.kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_ref  # noqa: E402
from pagedllm.kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16]
TOKENS = 67 if ON_CUDA else 5
HIDDEN = [4096, 1000] if ON_CUDA else [256, 200]


def _rand(*shape, device, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(device, assert_close, dtype, hidden):
    x = _rand(TOKENS, hidden, device=device, dtype=dtype) * 3
    w = _rand(hidden, device=device, dtype=dtype, seed=1)
    ref, _ = rms_norm_ref(x, w, 1e-6)
    assert_close(rms_norm(x, w, 1e-6), ref, interp_bound=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, assert_close, dtype):
    hidden = HIDDEN[0]
    x = _rand(TOKENS, hidden, device=device, dtype=dtype)
    res = _rand(TOKENS, hidden, device=device, dtype=dtype, seed=1) * 4
    w = _rand(hidden, device=device, dtype=dtype, seed=2)
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    _, ref_res = rms_norm_ref(x, w, 1e-5, residual=res)
    if ON_CUDA:
        assert torch.equal(new_res, ref_res)  # the sum is rounded once, like the eager add
    else:
        assert_close(new_res, ref_res)  # the interpreter truncates fp32 -> bf16 instead of rounding
    assert_close(normed, rms_norm_ref(new_res, w, 1e-5)[0], interp_bound=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [11008, 1000] if ON_CUDA else [256, 100])
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
def test_silu_and_mul(device, assert_close, dtype, inter, gelu):
    x = _rand(TOKENS, 2 * inter, device=device, dtype=dtype) * 3
    ref = silu_and_mul_ref(x.double(), gelu)
    assert_close(silu_and_mul(x, gelu=gelu), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (7, 1)], ids=["gqa1", "gqa4", "gqa7"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "norm+rope"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_rope_kv_write(device, assert_close, dtype, heads, qk_norm, partial, block_size):
    """q normed and rotated in place in the fused projection's output; k (normed, rotated) and v
    land in the paged cache at scattered slots, slot -1 writes nothing, v in qkv is untouched."""
    num_heads, num_kv_heads = heads
    head_dim = 128 if ON_CUDA else 32
    rot_dim = head_dim // 2 if partial else head_dim
    num_blocks, max_pos = 9, 4096
    freqs = torch.arange(max_pos)[:, None].float() / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    qkv = _rand(TOKENS, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype) * 2
    positions = torch.randint(0, max_pos, (TOKENS,), generator=torch.Generator().manual_seed(3)).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(4))[:TOKENS]
    slots[1] = -1  # padding: writes nothing
    slots = slots.to(device)
    q_w = _rand(head_dim, device=device, dtype=dtype, seed=5) if qk_norm else None
    k_w = _rand(head_dim, device=device, dtype=dtype, seed=6) if qk_norm else None
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    ref_cache = cache.clone()
    ref_q = rope_kv_write_ref(qkv.clone(), positions, cos_sin, num_heads, num_kv_heads, head_dim, ref_cache, slots, q_w, k_w)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    q = rope_kv_write(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim, cache, slots, q_w, k_w)
    assert q.data_ptr() == qkv.data_ptr()  # rotated in place
    assert_close(q, ref_q, interp_bound=3e-2)
    assert_close(cache, ref_cache, interp_bound=3e-2)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "norm+rope"])
def test_rope_kv_write_to_q_out(device, assert_close, qk_norm):
    """With q_out (a piecewise graph's persistent buffer) q lands there, equal to the in-place result,
    and qkv keeps its projection output."""
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64 if ON_CUDA else 32, 16
    dtype = torch.float32
    freqs = torch.arange(TOKENS)[:, None].float() / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    qkv = _rand(TOKENS, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype)
    positions = torch.arange(TOKENS, device=device)
    slots = torch.arange(TOKENS, device=device)
    weights = [_rand(head_dim, device=device, dtype=dtype, seed=s) if qk_norm else None for s in (5, 6)]
    in_place_cache = torch.zeros(2, -(-TOKENS // block_size), block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    cache = in_place_cache.clone()
    expected = rope_kv_write(qkv.clone(), positions, cos_sin, num_heads, num_kv_heads, head_dim, in_place_cache, slots, *weights)
    before = qkv.clone()
    buffer = torch.full((TOKENS + 3, num_heads, head_dim), float("nan"), device=device, dtype=dtype)
    q = rope_kv_write(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim, cache, slots, *weights, q_out=buffer[:TOKENS])
    assert q.data_ptr() == buffer.data_ptr()
    assert torch.equal(q, expected) and torch.equal(cache, in_place_cache) and torch.equal(qkv, before)
    assert buffer[TOKENS:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "norm+rope"])
def test_rope_kv_write_fp8_cache(device, assert_close, dtype, qk_norm):
    """Into a float8 cache: k / k_scale and v / v_scale of the keys and values it writes into a cache of the model's
    dtype (test_rope_kv_write checks those), saturated at +-448 (k_scale small enough that some keys are), the same
    codes as torch's quantization of them; and in float32 on the CPU, the same codes as the reference's."""
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 32, 8, 128 if ON_CUDA else 32, 16, 9
    k_scale, v_scale = 0.01, 0.3
    freqs = torch.arange(64)[:, None].float() / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    qkv = _rand(TOKENS, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype) * 2
    positions = torch.randint(0, 64, (TOKENS,), generator=torch.Generator().manual_seed(3)).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(4))[:TOKENS]
    slots[1] = -1
    slots = slots.to(device)
    weights = [_rand(head_dim, device=device, dtype=dtype, seed=s) if qk_norm else None for s in (5, 6)]
    args = (positions, cos_sin, num_heads, num_kv_heads, head_dim)
    plain = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    q_plain = rope_kv_write(qkv.clone(), *args, plain, slots, *weights)
    cache = torch.zeros(plain.shape, device=device, dtype=KV_FP8)
    ref_cache = cache.clone()
    ref_q = rope_kv_write_ref(qkv.clone(), *args, ref_cache, slots, *weights, k_scale=k_scale, v_scale=v_scale)
    q = rope_kv_write(qkv, *args, cache, slots, *weights, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(q, q_plain)
    assert_close(q, ref_q, interp_bound=3e-2)
    expected = torch.stack([quantize_fp8(plain[0], k_scale), quantize_fp8(plain[1], v_scale)])
    assert expected[0].float().abs().max() == 448  # some keys saturated
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    if dtype == torch.float32 and not ON_CUDA:
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    with pytest.raises(AssertionError):  # scales are for a float8 cache only
        rope_kv_write(qkv, *args, plain, slots, *weights, k_scale=2.0)
