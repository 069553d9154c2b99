"""Gated activations ``h = act(g)·u`` for SwiGLU (act = silu) and GeGLU (act = gelu, tanh form).

Forward reads g and u once and writes h. Backward recomputes act(g) instead of storing it:
    du = dh · act(g)
    dg = dh · u · act'(g)
with
    silu(g) = g·σ(g),            silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
    gelu(g) = ½g(1 + t),  t = tanh(k(g + c·g³)),  k = √(2/π), c = 0.044715
    gelu'(g) = ½(1 + t) + ½g·(1 − t²)·k·(1 + 3c·g²)
The gradients overwrite g and u in place: both are projection outputs that nothing else
reads after this backward (their projections saved their own inputs), so their memory
is reused instead of allocating two more activation-sized buffers.
tanh is written as 2σ(2z) − 1, which every Triton version has.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_K = 0.7978845608028654  # sqrt(2/pi)
_C = 0.044715


@triton.jit
def _act(g, GELU: tl.constexpr):
    if GELU:
        t = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g))) - 1.0
        return 0.5 * g * (1.0 + t)
    return g * tl.sigmoid(g)


@triton.jit
def _act_mul_fwd(G, U, H, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (_act(g, GELU) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _act_mul_bwd(DH, G, U, n, GELU: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    if STORE_H:  # the LoRA MLP's backward also needs h itself (for the down adapter's dB)
        tl.store(DH + offs, (a * u).to(DH.dtype.element_ty), mask=mask)
    tl.store(G + offs, (dh * u * da).to(G.dtype.element_ty), mask=mask)
    tl.store(U + offs, (dh * a).to(U.dtype.element_ty), mask=mask)


BLOCK = 1024


def act_mul_forward(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """Contiguous g, u of one shape -> act(g)·u."""
    h = torch.empty_like(g)
    n = g.numel()
    _act_mul_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, GELU=gelu, BLOCK=BLOCK, num_warps=4)
    return h


def act_mul_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gelu: bool,
                      store_h: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrites g with dg and u with du (and dh with h = act(g)·u when ``store_h``);
    returns dg, du. All contiguous, one shape."""
    n = g.numel()
    _act_mul_bwd[(triton.cdiv(n, BLOCK),)](dh, g, u, n, GELU=gelu, STORE_H=store_h, BLOCK=BLOCK, num_warps=4)
    return g, u
