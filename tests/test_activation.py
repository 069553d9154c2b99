"""SwiGLU/GeGLU kernels against the reference (float64 for fp32) and transformers' ACT2FN."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastqlora.ops import backend
from fastqlora.ops.activation import act_mul, act_mul_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1,), (3, 333), (2, 5, 1031)], ids=str)
def test_kernel_matches_reference(kernel_device, act, shape):
    for dtype in _dtypes(kernel_device):
        g = torch.Generator().manual_seed(len(shape))
        gate = (torch.randn(shape, generator=g) * 3).to(kernel_device, dtype).requires_grad_(True)
        up = torch.randn(shape, generator=g).to(kernel_device, dtype).requires_grad_(True)
        dh = torch.randn(shape, generator=g).to(kernel_device, dtype)
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        g2 = gate.detach().to(ref_dtype).requires_grad_(True)
        u2 = up.detach().to(ref_dtype).requires_grad_(True)
        h2 = act_mul_reference(g2, u2, act)
        h2.backward(dh.to(ref_dtype))
        with backend("triton"):
            h = act_mul(gate * 1, up * 1, act)  # kernel inputs are intermediates, as in the MLP
        h.backward(dh)
        tol = TOL[dtype]
        assert rel_err(h, h2) < tol
        assert rel_err(gate.grad, g2.grad) < tol * 3
        assert rel_err(up.grad, u2.grad) < tol * 3


@pytest.mark.parametrize("act,name", [("silu", "silu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_matches_transformers_activation(kernel_device, act, name):
    from transformers.activations import ACT2FN

    gate = torch.randn(7, 129, device=kernel_device)
    up = torch.randn(7, 129, device=kernel_device)
    with backend("triton"):
        h = act_mul(gate.clone(), up.clone(), act)
    assert rel_err(h, ACT2FN[name](gate) * up) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_llama_mlp_shape_bf16(act):
    gate = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    up = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    dh = torch.randn_like(gate)
    with backend("triton"):
        h = act_mul(gate * 1, up * 1, act)
    h.backward(dh)
    g2, u2 = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    act_mul_reference(g2, u2, act).backward(dh)
    assert rel_err(gate.grad, g2.grad) < 1e-2 and rel_err(up.grad, u2.grad) < 1e-2
