"""Attention of one new query a row over the KV cache, in one launch a layer (generation's
decode step).

One program a (row b, key head j) takes the ``rep = Hq / Hk`` query heads that read key
head j as the rows of one tile, and walks the cache in blocks of BLOCK_T positions with an
online softmax (running max m, running sum l, running output acc; each block rescales the
old ones by exp(m_old − m_new)). A position t is attended when
    t <= start  (causal; ``start`` is the query's cache position, read on the device),
    valid[b, t]  (left padding's holes and unwritten positions are not),
    start − t < window  (sliding-window layers),
and the score is ``scale·q·k``, soft-capped as ``cap·tanh(s / cap)`` where the model does.
Keys and values are read once in their own dtype; every product and sum is fp32 (the dots
run with IEEE fp32 inputs), as the torch path (generation.cached_attention) computes, and the
output is rounded once. A row with nothing to attend gives zeros, as that path does.

It replaces that path's ~16 launches a layer (casts of the whole cache to fp32, two batched
matmuls, the mask's construction, softmax, the output's permute) at one query a row; the
prefill's many queries stay on the torch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(Q, K, V, VALID, START, O, T, rep, D, scale, window, softcap,
                             q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, valid_sb, o_sb, o_sh,
                             BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_T)
    rm = r < rep
    dm = d < D
    heads = j * rep + r
    q = tl.load(Q + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    pos = tl.load(START).to(tl.int64)
    hi = tl.minimum(pos + 1, T)
    lo = pos * 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
        lo = (lo // BLOCK_T) * BLOCK_T
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tt = t0 + t
        inside = tt < hi
        keep = inside & (tl.load(VALID + b * valid_sb + tt, mask=inside, other=0) != 0)
        if HAS_WINDOW:
            keep = keep & (pos - tt < window)
        tdm = inside[:, None] & dm[None, :]
        k = tl.load(K + b * k_sb + tt[:, None] * k_st + j * k_sh + d[None, :], mask=tdm, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_R, BLOCK_T]
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # cap·tanh(s / cap)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: no rescale
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + b * v_sb + tt[:, None] * v_st + j * v_sh + d[None, :], mask=tdm, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # nothing attended: acc stayed 0
    tl.store(O + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(O.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


def decode_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                         start: torch.Tensor, scale: float, window: int | None, softcap: float | None,
                         block_t: int = 64) -> torch.Tensor:
    """q ``[B, 1, Hq, D]``, k and v ``[B, T, Hk, D]`` (unit stride on D), valid bool
    ``[B, ≥T]``, start a one-element long tensor: ``[B, 1, Hq, D]`` in q's dtype."""
    B, _, Hq, D = q.shape
    T, Hk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    rep = Hq // Hk
    _decode_attention_kernel[(B, Hk)](
        q, k, v, valid, start, o, T, rep, D, scale, window or 0, softcap or 0.0,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0), o.stride(0), o.stride(2),
        BLOCK_R=max(16, triton.next_power_of_2(rep)), BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, num_warps=4)
    return o
