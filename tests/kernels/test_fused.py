import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from pagedllm.kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_ref  # noqa: E402
from pagedllm.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402

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
@pytest.mark.parametrize("rot_dim", [128, 64] if ON_CUDA else [64, 32])
def test_rotary_in_place(device, assert_close, dtype, rot_dim):
    head_dim = 128 if ON_CUDA else 64
    num_heads, num_kv_heads, max_pos = 7, 1, 4096
    freqs = torch.arange(max_pos)[:, None].float() / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    # q and k as views into a fused qkv projection (token stride != heads * head_dim).
    qkv = _rand(TOKENS, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype)
    q = qkv[:, : num_heads * head_dim].view(TOKENS, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(TOKENS, num_kv_heads, head_dim)
    positions = torch.randint(0, max_pos, (TOKENS,), generator=torch.Generator().manual_seed(3)).to(device)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cos_sin)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    apply_rotary(q, k, positions, cos_sin)
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [11008, 1000] if ON_CUDA else [256, 100])
def test_silu_and_mul(device, assert_close, dtype, inter):
    x = _rand(TOKENS, 2 * inter, device=device, dtype=dtype) * 3
    ref = silu_and_mul_ref(x.double())
    assert_close(silu_and_mul(x), ref)
