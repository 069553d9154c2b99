"""Rotary embedding applied in place to q and k in one launch.

For each token (b, s) at position p = position_ids[b, s], and each head, the pair
(x₁, x₂) = (x[i], x[i + D/2]) rotates by θ_i(p):
    forward:   x₁' = x₁·cos − x₂·sin,   x₂' = x₂·cos + x₁·sin
The map is a rotation, so its Jacobian is its transpose, the rotation by −θ:
    backward:  d₁ = g₁·cos + g₂·sin,    d₂ = g₂·cos − g₁·sin
Nothing is saved but the position ids (the tables belong to the model). cos and sin
are rounded to the activations' dtype first, as transformers does; the arithmetic is
fp32 with one rounding at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(X, base, stride_h, n_heads, cos, sin, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                BACKWARD: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    p1 = X + base + h * stride_h + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos + x2 * sin
        y2 = x2 * cos - x1 * sin
    else:
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
    tl.store(p1, y1.to(X.dtype.element_ty), mask=mask)
    tl.store(p1 + half, y2.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, seq_len, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, n_q, n_k, half,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    tok = tl.program_id(0)
    b = tok // seq_len
    s = tok % seq_len
    p = tl.load(POS + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < half
    cos = tl.load(COS + p * half + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    sin = tl.load(SIN + p * half + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    qbase = b.to(tl.int64) * q_sb + s.to(tl.int64) * q_ss
    kbase = b.to(tl.int64) * k_sb + s.to(tl.int64) * k_ss
    _rope_heads(Q, qbase, q_sh, n_q, cos, sin, half, BLOCK_HQ, BLOCK_D, BACKWARD)
    _rope_heads(K, kbase, k_sh, n_k, cos, sin, half, BLOCK_HK, BLOCK_D, BACKWARD)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
          backward: bool = False, num_warps: int | None = None) -> None:
    """Rotate q [B,S,Hq,D] and k [B,S,Hk,D] in place (unit stride on D; any other strides).
    cos/sin: fp32 [P, D/2] contiguous; position_ids [B, S]."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    half = D // 2
    pos = position_ids.expand(B, S).contiguous()
    block_d = triton.next_power_of_2(half)
    _rope_kernel[(B * S,)](q, k, cos, sin, pos, S, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                           k.stride(2), Hq, Hk, half, BLOCK_HQ=triton.next_power_of_2(Hq),
                           BLOCK_HK=max(1, triton.next_power_of_2(Hk)), BLOCK_D=block_d, BACKWARD=backward,
                           num_warps=num_warps or (4 if Hq * half <= 4096 else 8))
