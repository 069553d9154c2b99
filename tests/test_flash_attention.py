"""Flash attention (Triton) against float64 attention on upcast inputs: output, LSE,
dQ/dK/dV, every feature alone and together, lengths that are not block multiples."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastqlora.ops import backend
from fastqlora.ops.attention import attention, attention_reference

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _inputs(B, S, Hq, Hk, D, dtype, device, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # q, k, v as views of one fused projection output
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, generator=g).to(device, dtype)
        q = qkv[..., : Hq * D].unflatten(-1, (Hq, D))
        k = qkv[..., Hq * D:(Hq + Hk) * D].unflatten(-1, (Hk, D))
        v = qkv[..., (Hq + Hk) * D:].unflatten(-1, (Hk, D))
    else:
        q = torch.randn(B, S, Hq, D, generator=g).to(device, dtype)
        k = torch.randn(B, S, Hk, D, generator=g).to(device, dtype)
        v = torch.randn(B, S, Hk, D, generator=g).to(device, dtype)
    do = torch.randn(B, S, Hq, D, generator=g).to(device, dtype)
    return q, k, v, do


def _check(q, k, v, do, dtype, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with backend("triton"):
        out = attention(*leaves, **kw)
    out.backward(do)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, lse = attention_reference(*ref_leaves, return_lse=True, compute_dtype=torch.float64, **kw)
    ref.backward(do.double())
    tol = TOL[dtype]
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < tol
    for got, want in zip(leaves, ref_leaves):
        # relative, or absolute where the true gradient is zero (one key: dq = dk = 0)
        err = (got.grad.double() - want.grad).norm()
        assert err < tol * 2 * max(float(want.grad.norm()), 1.0)
    return lse


def _dtypes(device):
    # each dtype compiles its own kernels; fp32 (ieee dots, no tensor cores) is checked by
    # the interpreter, the GPU checks bf16, what training uses (and fp16 below)
    return [torch.float32, torch.float16] if device == "cpu" else [torch.bfloat16]


CASES = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "gqa4": dict(heads=(4, 1)),
    "window": dict(sliding_window=9),
    "softcap": dict(softcap=5.0, scale=0.3),
    "all": dict(heads=(4, 2), sliding_window=13, softcap=7.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("S", [1, 17, 70])
def test_features_on_small_shapes(kernel_device, case, S):
    kw = dict(CASES[case])
    hq, hk = kw.pop("heads", (2, 2))
    for dtype in _dtypes(kernel_device)[:1 if kernel_device == "cpu" and S == 70 else None]:
        q, k, v, do = _inputs(2, S, hq, hk, 16 if kernel_device == "cpu" else 64, dtype, kernel_device, seed=S)
        _check(q, k, v, do, dtype, **kw)


def test_packed_sequences_and_strided_inputs(kernel_device):
    lengths = [1, 20, 7, 33, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=kernel_device)
    for dtype in _dtypes(kernel_device):
        q, k, v, do = _inputs(1, sum(lengths), 4, 2, 32, dtype, kernel_device, seed=3, strided=True)
        assert not q.is_contiguous()
        _check(q, k, v, do, dtype, cu_seqlens=cu)
        _check(q, k, v, do, dtype, cu_seqlens=cu, sliding_window=5, softcap=4.0)


@pytest.mark.parametrize("D", [8, 24, 40])
def test_head_dims_between_the_kernel_widths(kernel_device, D):
    # zero-padded to the next width (16, 32, 64): scores, output and gradients unchanged
    from fastqlora.ops.attention import flash_width

    assert flash_width(D) == {8: 16, 24: 32, 40: 64}[D]
    dtype = _dtypes(kernel_device)[0]
    q, k, v, do = _inputs(2, 19, 4, 2, D, dtype, kernel_device, seed=D)
    _check(q, k, v, do, dtype)
    _check(q, k, v, do, dtype, sliding_window=6, softcap=3.0)


def test_head_dims_past_256_take_the_torch_path():
    from fastqlora.ops.attention import flash_width

    assert flash_width(256) == 256 and flash_width(257) is None


def test_lse_matches_reference(kernel_device):
    from fastqlora.ops.attention import _tokens
    from fastqlora.triton_kernels.flash_attention import flash_attn_forward

    q, k, v, _ = _inputs(1, 45, 2, 1, 32, torch.float32, kernel_device, seed=4)
    cu = torch.tensor([0, 45], dtype=torch.int32, device=kernel_device)
    _, lse = flash_attn_forward(_tokens(q), _tokens(k), _tokens(v), cu, 45, 32**-0.5, True, None, None)
    _, ref = attention_reference(q.double(), k.double(), v.double(), return_lse=True, compute_dtype=torch.float64)
    assert rel_err(lse.view(2, 1, 45).transpose(0, 1), ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                                     (128, torch.float16), (96, torch.bfloat16), (80, torch.bfloat16)], ids=str)
def test_gpu_lengths_and_head_dims(D, dtype):
    for S in (1, 17, 777, 2049):
        q, k, v, do = _inputs(1, S, 8, 2, D, dtype, "cuda", seed=S + D)
        _check(q, k, v, do, dtype)
        if S > 17 and D == 128:
            _check(q, k, v, do, dtype, sliding_window=500, softcap=30.0)


@pytest.mark.gpu
def test_gpu_packed_mixed_lengths_bf16():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 600, (24,), generator=g).tolist()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v, do = _inputs(1, sum(lengths), 32, 8, 128, torch.bfloat16, "cuda", seed=1, strided=True)
    _check(q, k, v, do, torch.bfloat16, cu_seqlens=cu)
