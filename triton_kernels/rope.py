"""Rotary embedding applied in place to q and k in one launch.

For each token (b, s) at position p = position_ids[b, s], and each head, the pair
(x₁, x₂) = (x[i], x[i + R/2]) rotates by θ_i(p), i < R/2, where R/2 is the tables' width
(R = D, or the rotated share of a partial-rotary model; dimensions R.. are not touched):
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
def _head_ptrs(X, base, stride_h, n_heads, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    return X + base + h * stride_h + d, (h < n_heads) & (d < half)


@triton.jit
def _rotate(x1, x2, cos, sin, BACKWARD: tl.constexpr):
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if BACKWARD:
        return x1 * cos + x2 * sin, x2 * cos - x1 * sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, seq_len, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, n_q, n_k, half,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    tok = tl.program_id(0)
    b = tok // seq_len
    s = tok % seq_len
    qp, qm = _head_ptrs(Q, b.to(tl.int64) * q_sb + s.to(tl.int64) * q_ss, q_sh, n_q, half, BLOCK_HQ, BLOCK_D)
    kp, km = _head_ptrs(K, b.to(tl.int64) * k_sb + s.to(tl.int64) * k_ss, k_sh, n_k, half, BLOCK_HK, BLOCK_D)
    # Every load of q and k is issued before the position id comes back: the cos/sin
    # addresses wait on it, and loads behind them in program order would wait too (one
    # memory latency, not three, before the first store).
    q1 = tl.load(qp, mask=qm, other=0.0)
    q2 = tl.load(qp + half, mask=qm, other=0.0)
    k1 = tl.load(kp, mask=km, other=0.0)
    k2 = tl.load(kp + half, mask=km, other=0.0)
    p = tl.load(POS + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < half
    cos = tl.load(COS + p * half + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    sin = tl.load(SIN + p * half + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    y1, y2 = _rotate(q1, q2, cos, sin, BACKWARD)
    tl.store(qp, y1.to(Q.dtype.element_ty), mask=qm)
    tl.store(qp + half, y2.to(Q.dtype.element_ty), mask=qm)
    y1, y2 = _rotate(k1, k2, cos, sin, BACKWARD)
    tl.store(kp, y1.to(K.dtype.element_ty), mask=km)
    tl.store(kp + half, y2.to(K.dtype.element_ty), mask=km)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
          backward: bool = False, num_warps: int | None = None) -> None:
    """Rotate q [B,S,Hq,D] and k [B,S,Hk,D] in place (unit stride on D; any other strides).
    cos/sin: fp32 [P, R/2] contiguous, R <= D the rotated dimensions; position_ids [B, S]."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    half = cos.shape[-1]
    if 2 * half > D:
        raise ValueError(f"rope tables have {half} frequencies, more than head_dim {D} / 2")
    pos = position_ids.expand(B, S).contiguous()
    block_d = triton.next_power_of_2(half)
    _rope_kernel[(B * S,)](q, k, cos, sin, pos, S, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                           k.stride(2), Hq, Hk, half, BLOCK_HQ=triton.next_power_of_2(Hq),
                           BLOCK_HK=max(1, triton.next_power_of_2(Hk)), BLOCK_D=block_d, BACKWARD=backward,
                           num_warps=num_warps or (4 if Hq * half <= 4096 else 8))
