"""The multi-LoRA shrink/expand (kernels/lora.py), segmented and row-indexed, against the per-adapter torch loop in
float64, on fresh random inputs: ranks 8 / 16 / 64, fused parts (3 x rank columns), 1 to 300 tokens, skewed adapter
mixes with base tokens among them."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.lora import LoRASegments, lora_delta  # noqa: E402
from pagedllm.lora.layers import lora_delta_ref  # noqa: E402


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("rank_width", [8, 16, 3 * 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["segmented", "row-indexed"])
def test_lora_delta(device, assert_close, tokens, rank_width, dtype, kernel):
    g = torch.Generator().manual_seed(tokens * 7 + rank_width)
    slots_n, n = 4, 80
    k = 1100 if tokens == 7 else 96  # a K longer than one program's share: the row-indexed shrink splits it
    rng = np.random.default_rng(tokens + rank_width)
    token_slots = rng.choice([-1, 0, 1, 3], size=tokens, p=[0.2, 0.6, 0.15, 0.05])  # slot 2 unused, 0 dominant
    x = torch.randn(tokens, k, generator=g).to(device, dtype)
    a = (torch.randn(slots_n, rank_width, k, generator=g) / k**0.5).to(device, dtype)
    b = (torch.randn(slots_n, n, rank_width, generator=g) / rank_width**0.5).to(device, dtype)
    base = torch.randn(tokens, n, generator=g).to(device, dtype)
    ref = lora_delta_ref(x.double(), a.double(), b.double(), base.double().clone(), torch.from_numpy(token_slots).to(device))
    if kernel == "segmented":
        segments = LoRASegments.build(token_slots, device)
        out = base.clone() if segments is None else lora_delta(x, a, b, base.clone(), segments)
    else:
        out = lora_delta(x, a, b, base.clone(), None, torch.from_numpy(token_slots).to(device))
    assert_close(out, ref, interp_bound=3e-2)
    assert torch.equal(out[torch.from_numpy(token_slots < 0).to(device)], base[torch.from_numpy(token_slots < 0).to(device)])
