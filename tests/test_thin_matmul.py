"""The one-launch thin product ``x·Aᵀ`` of generation's LoRA branches against float64."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err


@pytest.mark.parametrize("M,K,R", [(1, 200, 16), (5, 4100, 48), (16, 333, 7), (3, 64, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_thin_matmul_matches_float64(kernel_device, M, K, R, dtype):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    g = torch.Generator().manual_seed(M * K + R)
    x = torch.randn(M, K + 3, generator=g).to(kernel_device, dtype)[:, :K]  # a row stride past K
    a = torch.randn(R, K, generator=g).to(kernel_device, dtype)
    want = x.double() @ a.double().t()
    got = thin_matmul(x, a)
    assert got.shape == (M, R) and got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-3)
    # the split counters were left at zero: a second call (what a graph replay does) agrees
    assert torch.equal(thin_matmul(x, a), got)
    assert torch.equal(thin_matmul(x, a, block_k=32), thin_matmul(x, a, block_k=32))


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,R", [(1, 4096, 48), (8, 14336, 16), (16, 4096, 32), (2, 3072, 40)])
def test_thin_matmul_bf16_on_the_gpu(M, K, R):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    g = torch.Generator(device="cuda").manual_seed(K + R)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    a = torch.randn(R, K, device="cuda", generator=g).bfloat16() * 0.02
    assert rel_err(thin_matmul(x, a), x.double() @ a.double().t()) < 1e-2


def test_thin_matmul_refuses_bad_input(kernel_device):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    x = torch.randn(2, 64, device=kernel_device)
    with pytest.raises(ValueError, match="share K"):
        thin_matmul(x, torch.randn(4, 65, device=kernel_device))
    with pytest.raises(ValueError, match="1 to 16 rows"):
        thin_matmul(torch.randn(17, 64, device=kernel_device), torch.randn(4, 64, device=kernel_device))
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        thin_matmul(x, torch.randn(4, 64, device=kernel_device, dtype=torch.float64))
