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

In generation's steps the same launch can also store the rotated k and the untouched v into
the KV cache at rows ``row0 + s`` (CACHE): two index copies a layer fewer.
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
                 V, KC, VC, ROW0, v_sb, v_ss, v_sh, c_sb, c_st, c_sh,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
                 CACHE: tl.constexpr):
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
    if CACHE:  # v's two halves (the whole head: the caller rotates all of D), and the cache row
        vp, _ = _head_ptrs(V, b.to(tl.int64) * v_sb + s.to(tl.int64) * v_ss, v_sh, n_k, half, BLOCK_HK, BLOCK_D)
        v1 = tl.load(vp, mask=km, other=0.0)
        v2 = tl.load(vp + half, mask=km, other=0.0)
        row = tl.load(ROW0).to(tl.int64) + s
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
    if CACHE:
        kc, _ = _head_ptrs(KC, b.to(tl.int64) * c_sb + row * c_st, c_sh, n_k, half, BLOCK_HK, BLOCK_D)
        vc, _ = _head_ptrs(VC, b.to(tl.int64) * c_sb + row * c_st, c_sh, n_k, half, BLOCK_HK, BLOCK_D)
        tl.store(kc, y1.to(KC.dtype.element_ty), mask=km)
        tl.store(kc + half, y2.to(KC.dtype.element_ty), mask=km)
        tl.store(vc, v1, mask=km)
        tl.store(vc + half, v2, mask=km)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
          backward: bool = False, num_warps: int | None = None,
          cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rotate q [B,S,Hq,D] and k [B,S,Hk,D] in place (unit stride on D; any other strides).
    cos/sin: fp32 [P, R/2] contiguous, R <= D the rotated dimensions; position_ids [B, S].
    ``cache`` = (v [B,S,Hk,D], keys, values [B,T,Hk,D] (one strides), row0 (a [1] integer tensor)):
    also store the rotated k and v at rows row0 + s of keys and values (forward only, R = D)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    half = cos.shape[-1]
    if 2 * half > D:
        raise ValueError(f"rope tables have {half} frequencies, more than head_dim {D} / 2")
    if cache is not None:
        v, keys, values = cache[:3]
        if backward or 2 * half != D:
            raise ValueError("rope_: the cache store takes the forward rotation of whole heads (R = D)")
        if v.shape != k.shape or keys.shape != values.shape or keys.stride() != values.stride() \
                or keys.shape[0] != B or keys.shape[2:] != (Hk, D) or v.stride(-1) != 1 or keys.stride(-1) != 1:
            raise ValueError(f"rope_: v {tuple(v.shape)} must match k {tuple(k.shape)} and the cache "
                             f"{tuple(keys.shape)} / {tuple(values.shape)} hold [B, T, Hk, D] with unit stride on D")
        ca = (v, keys, values, cache[3], v.stride(0), v.stride(1), v.stride(2), keys.stride(0), keys.stride(1),
              keys.stride(2))
    else:
        ca = (q, q, q, position_ids, 0, 0, 0, 0, 0, 0)
    pos = position_ids.expand(B, S).contiguous()
    block_d = triton.next_power_of_2(half)
    _rope_kernel[(B * S,)](q, k, cos, sin, pos, S, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                           k.stride(2), Hq, Hk, half, *ca, BLOCK_HQ=triton.next_power_of_2(Hq),
                           BLOCK_HK=max(1, triton.next_power_of_2(Hk)), BLOCK_D=block_d, BACKWARD=backward,
                           CACHE=cache is not None, num_warps=num_warps or (4 if Hq * half <= 4096 else 8))
