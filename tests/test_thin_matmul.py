"""The one-launch thin product ``x·Aᵀ`` of generation's LoRA branches against float64."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err


@pytest.mark.parametrize("M,K,R", [(1, 200, 16), (5, 4100, 48), (16, 333, 7), (3, 64, 40), (2, 9000, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["split", "rows"])
def test_thin_matmul_matches_float64(kernel_device, M, K, R, dtype, method):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    g = torch.Generator().manual_seed(M * K + R)
    x = torch.randn(M, K + 3, generator=g).to(kernel_device, dtype)[:, :K]  # a row stride past K
    a = torch.randn(R, K + 1, generator=g).to(kernel_device, dtype)[:, :K]
    want = x.double() @ a.double().t()
    got = thin_matmul(x, a, method=method)
    assert got.shape == (M, R) and got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-3)
    # the split counters were left at zero: a second call (what a graph replay does) agrees
    assert torch.equal(thin_matmul(x, a, method=method), got)
    if method == "split":
        assert torch.equal(thin_matmul(x, a, block_k=32, method=method), thin_matmul(x, a, block_k=32, method=method))


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,R", [(1, 4096, 48), (8, 14336, 16), (16, 4096, 32), (2, 3072, 40), (1, 14336, 16)])
@pytest.mark.parametrize("method", ["split", "rows"])
def test_thin_matmul_bf16_on_the_gpu(M, K, R, method):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    g = torch.Generator(device="cuda").manual_seed(K + R)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    a = torch.randn(R, K, device="cuda", generator=g).bfloat16() * 0.02
    assert rel_err(thin_matmul(x, a, method=method), x.double() @ a.double().t()) < 1e-2


def test_thin_matmul_refuses_bad_input(kernel_device):
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    x = torch.randn(2, 64, device=kernel_device)
    with pytest.raises(ValueError, match="share K"):
        thin_matmul(x, torch.randn(4, 65, device=kernel_device))
    with pytest.raises(ValueError, match="1 to 16 rows"):
        thin_matmul(torch.randn(17, 64, device=kernel_device), torch.randn(4, 64, device=kernel_device))
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        thin_matmul(x, torch.randn(4, 64, device=kernel_device, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        thin_matmul(x, torch.randn(4, 64, device=kernel_device), method="dense")


def test_thin_rows_switch(kernel_device, monkeypatch):
    """FASTQLORA_THIN_ROWS=0 sends a decode step's one-row thin product to the split-K kernel;
    unset, to the rows kernel; the two agree; anything but 0/1 is refused by name."""
    import fastqlora.triton_kernels.thin_matmul as tm
    from fastqlora.ops.lora_decode import thin_product

    seen = []
    real = tm.thin_matmul

    def spy(x, a, block_k=128, method="auto"):
        seen.append(method)
        return real(x, a, block_k=block_k, method=method)

    monkeypatch.setattr(tm, "thin_matmul", spy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 300, generator=g).to(kernel_device)
    a = torch.randn(24, 300, generator=g).to(kernel_device)
    monkeypatch.delenv("FASTQLORA_THIN_ROWS", raising=False)
    rows = thin_product(x, a)
    monkeypatch.setenv("FASTQLORA_THIN_ROWS", "0")
    split = thin_product(x, a)
    assert seen == ["auto", "split"]
    assert rel_err(rows, split) < 1e-5 and rel_err(rows, x.double() @ a.double().t()) < 1e-5
    monkeypatch.setenv("FASTQLORA_THIN_ROWS", "yes")
    with pytest.raises(ValueError, match="FASTQLORA_THIN_ROWS='yes'"):
        thin_product(x, a)


@pytest.mark.parametrize("M,K,want", [(1, 4100, "rows"), (4, 9000, "rows"), (8, 4096, "rows"), (8, 4100, "split"),
                                      (5, 9000, "split"), (16, 64, "split")])
def test_auto_picks_rows_up_to_its_measured_sizes(kernel_device, M, K, want):
    from fastqlora.triton_kernels.thin_matmul import rows_kernel_fits, thin_matmul

    assert rows_kernel_fits(M, K) == (want == "rows")
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g).to(kernel_device)
    a = torch.randn(3, K, generator=g).to(kernel_device)
    assert torch.equal(thin_matmul(x, a), thin_matmul(x, a, method=want))
