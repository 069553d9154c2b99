"""Backward of the gated MLP activation ``h = act(g)·u``, in place, for the LoRA MLP.

Given the recomputed g, u and the incoming dh, one pass writes
``h`` over dh, ``dg = dh·u·act'(g)`` over g and ``du = dh·act(g)`` over u, so the
backward of the MLP needs no buffer beyond the three it already holds. fp32 math:

* silu:      a = g·σ(g),  a' = σ(g)·(1 + g·(1 − σ(g)))
* gelu_tanh: t = tanh(c·(g + 0.044715·g³)), c = √(2/π),
             a = ½·g·(1 + t),  a' = ½·(1 + t) + ½·g·(1 − t²)·c·(1 + 3·0.044715·g²)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_act_bwd_kernel(g_ptr, u_ptr, dh_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, from a long-standing primitive
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        sig = tl.sigmoid(g)
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    tl.store(dh_ptr + offs, (a * u).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offs, (dh * u * da).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offs, (dh * a).to(u_ptr.dtype.element_ty), mask=mask)


def gated_act_bwd_(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str) -> None:
    """In place: dh ← act(g)·u, g ← dg, u ← du. All three contiguous, same shape and dtype."""
    if act not in ("silu", "gelu_tanh"):
        raise ValueError(f"unknown activation {act!r}; expected 'silu' or 'gelu_tanh'")
    n = g.numel()
    block = 1024
    _gated_act_bwd_kernel[(triton.cdiv(n, block),)](g, u, dh, n, GELU=act == "gelu_tanh", BLOCK=block, num_warps=4)
