"""RMSNorm kernel against the reference (float64 for fp32) and transformers' modules."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastqlora.ops import backend
from fastqlora.ops.rms_norm import rms_norm, rms_norm_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _case(shape, dtype, device, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + offset * 0 + 1.0).to(device=device, dtype=dtype)
    w.requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, w, dy


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 77), (3, 5, 33), (19, 130)], ids=str)
def test_kernel_matches_reference(kernel_device, shape, offset):
    for dtype in _dtypes(kernel_device):
        x, w, dy = _case(shape, dtype, kernel_device, offset, seed=len(shape) + int(offset))
        with backend("triton"):
            y = rms_norm(x, w, 1e-6, offset)
        y.backward(dy)
        gx, gw = x.grad, w.grad
        # reference in float64 for fp32, in the same dtype for 16-bit (its own rounding)
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        x2 = x.detach().to(ref_dtype).requires_grad_(True)
        w2 = w.detach().to(ref_dtype).requires_grad_(True)
        y2 = rms_norm_reference(x2, w2, 1e-6, offset)
        y2.backward(dy.to(ref_dtype))
        tol = TOL[dtype]
        assert rel_err(y, y2) < tol
        assert rel_err(gx, x2.grad) < tol * 5
        assert rel_err(gw, w2.grad) < tol * 5


def test_frozen_weight_gets_no_gradient(kernel_device):
    x, w, dy = _case((4, 65), torch.float32, kernel_device, 0.0, 3)
    w.requires_grad_(False)
    with backend("triton"):
        rms_norm(x, w, 1e-5).backward(dy)
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("gemma", [False, True])
def test_matches_transformers_module(kernel_device, gemma):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h = 96
    mod = (GemmaRMSNorm(h, eps=1e-6) if gemma else LlamaRMSNorm(h, eps=1e-6)).to(kernel_device)
    with torch.no_grad():
        mod.weight.normal_(0.0 if gemma else 1.0, 0.2)
    x = torch.randn(5, 7, h, device=kernel_device)
    with backend("triton"):
        y = rms_norm(x, mod.weight, 1e-6, 1.0 if gemma else 0.0)
    assert rel_err(y, mod(x)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_llama_shapes_on_gpu(dtype):
    x, w, dy = _case((2, 777, 4096), dtype, "cuda", 0.0, 9)
    with backend("triton"):
        y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    y2 = rms_norm_reference(x2, w2, 1e-5)
    y2.backward(dy)
    assert rel_err(y, y2) < 1e-2 and rel_err(x.grad, x2.grad) < 1e-2 and rel_err(w.grad, w2.grad) < 1e-2



@pytest.mark.parametrize("num_warps", [1, 2, 4], ids=str)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trained"])
def test_every_warps_choice_matches_reference(kernel_device, num_warps, weight_grad):
    """The benchmark sweeps the warps per row; each choice must give the reference's numbers
    (23 rows over the interpreter's 4 programs, so programs end on a partial row range)."""
    from fastqlora.triton_kernels.rms_norm import rms_norm_backward, rms_norm_forward

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(23, 200, generator=g) * 2).to(kernel_device)
    w = (torch.randn(200, generator=g) * 0.3 + 1).to(kernel_device)
    dy = torch.randn(23, 200, generator=g).to(kernel_device)
    y, r = rms_norm_forward(x, w, 1e-6, False, num_warps=num_warps)
    dx, dw = rms_norm_backward(dy, x, w, r, False, weight_grad, num_warps=num_warps)
    x2 = x.double().requires_grad_(True)
    w2 = w.double().requires_grad_(True)
    y2 = rms_norm_reference(x2, w2, 1e-6, 0.0)
    y2.backward(dy.double())
    assert rel_err(y, y2) < 1e-5
    assert rel_err(r, x.double().pow(2).mean(-1).add(1e-6).rsqrt()) < 1e-5
    assert rel_err(dx, x2.grad) < 5e-5
    if weight_grad:
        assert rel_err(dw, w2.grad) < 5e-5
    else:
        assert dw is None
