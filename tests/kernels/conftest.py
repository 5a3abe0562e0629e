"""Kernel tests run compiled on CUDA, else on CPU under Triton's interpreter (small shapes).

TRITON_INTERPRET must be set before triton is first imported; each test module then skips
itself through pytest.importorskip("triton") when triton is missing.
"""

import os
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: elementwise ratios blow up near zeros."""
    ref = ref.double().to(out.device)  # a reference built from host tensors meets a device result
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """Relative error within 1e-4 for float32 results, 1e-2 for bf16/fp16.

    interp_bound: a looser bf16 bound for the CPU interpreter only, for kernels chaining several
    bf16 casts: triton 3.9's interpreter truncates fp32 -> bf16 (up to 1 ulp, 2**-7 relative)
    where the GPU rounds to nearest.
    """

    def check(out: torch.Tensor, ref: torch.Tensor, interp_bound: float | None = None) -> None:
        assert out.shape == ref.shape
        assert not out.isnan().any()
        bound = 1e-4 if out.dtype == torch.float32 else 1e-2
        if interp_bound is not None and out.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1":
            bound = interp_bound
        err = _rel_err(out, ref)
        assert err < bound, f"relative error {err:.3g} >= {bound:g} ({out.dtype})"

    return check
