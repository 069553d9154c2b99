"""Attention of one new query a row over the KV cache (generation's decode step), split over
the cache's length as flash-decoding does: two launches a layer.

Why split: at one query a row there is little work a (row, head) — the whole layer at
Llama-3-8B batch 1 is 32 query heads — so one program a (row, key head) walking the cache
left ~8 programs for 132 SMs (the first version of this kernel, 0.2 ms a layer on the H200).
Here one program a (row b, query head h, split s) reads positions [s·C, (s+1)·C) of the
cache (C a power of two, chosen so that there are at most MAX_SPLITS splits), and writes
its partial softmax state: the running max m_s, the sum l_s = Σ_t exp(x_t − m_s) and the
unnormalised output acc_s = Σ_t exp(x_t − m_s)·v_t. The second launch, one program a (b, h),
combines them exactly:
    M = max_s m_s,   w_s = exp(m_s − M),   out = Σ_s w_s·acc_s / Σ_s w_s·l_s,
which equals softmax(x)·V over all positions (each split's terms rescaled to the same max).

A position t is attended when
    t <= start  (causal; ``start`` is the query's cache position, read on the device),
    valid[b, t]  (left padding's holes and unwritten positions are not),
    start − t < window  (sliding-window layers),
and the score is ``scale·q·k``, soft-capped as ``cap·tanh(s / cap)`` where the model does.
Within a split the positions go in blocks of BLOCK_T with an online softmax (each block
rescales the running m, l, acc by exp(m_old − m_new)). Keys and values are read in their own
dtype and every product and sum is fp32 (elementwise products and tree sums, no tensor-core
rounding), as the torch path (generation.cached_attention) computes; the output is rounded
once. A row with nothing to attend gives zeros, as that path does. The grid depends only on
the cache's capacity, never on ``start``, so a CUDA graph can replay it as the cache fills:
splits past ``start`` write an empty state (m = −inf, l = 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the most splits of the cache a (row, head); the combine reads them as one tile
MAX_SPLITS = 16


@triton.jit
def _decode_attention_split(Q, K, V, VALID, START, ML, ACC, T, rep, D, chunk, n_splits, scale, window, softcap,
                            q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, valid_sb,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    j = h // rep  # the key head this query head reads (repeat_interleave's order)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_T)
    dm = d < D
    q = tl.load(Q + b * q_sb + h * q_sh + d, mask=dm, other=0.0).to(tl.float32)
    pos = tl.load(START).to(tl.int64)
    hi = tl.minimum(tl.minimum(pos + 1, T), (s + 1) * chunk)  # one past this split's last position
    lo = s * chunk + pos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos - window + 1)
    m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tt = t0 + t
        inside = tt < hi
        keep = inside & (tl.load(VALID + b * valid_sb + tt, mask=inside, other=0) != 0)
        tdm = inside[:, None] & dm[None, :]
        k = tl.load(K + b * k_sb + tt[:, None] * k_st + j * k_sh + d[None, :], mask=tdm, other=0.0).to(tl.float32)
        x = tl.sum(k * q[None, :], 1) * scale  # [BLOCK_T]
        if HAS_SOFTCAP:
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)  # cap·tanh(x / cap)
        x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: no rescale
        p = tl.exp(x - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + b * v_sb + tt[:, None] * v_st + j * v_sh + d[None, :], mask=tdm, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    row = (b * tl.num_programs(1) + h) * n_splits + s
    tl.store(ML + 2 * row, m_i)
    tl.store(ML + 2 * row + 1, l_i)
    tl.store(ACC + row * BLOCK_D + d, acc)


@triton.jit
def _decode_attention_combine(ML, ACC, O, n_splits, D, o_sb, o_sh,
                              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = sp < n_splits
    row = (b * tl.num_programs(1) + h) * n_splits + sp
    m = tl.load(ML + 2 * row, mask=sm, other=float("-inf"))
    l = tl.load(ML + 2 * row + 1, mask=sm, other=0.0)
    acc = tl.load(ACC + row[:, None] * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
    big = tl.max(m, 0)
    w = tl.exp(m - tl.where(big == float("-inf"), 0.0, big))  # an empty split (m = −inf) weighs 0
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)  # nothing attended: acc is 0
    tl.store(O + b * o_sb + h * o_sh + d, out.to(O.dtype.element_ty), mask=d < D)


def split_plan(T: int, block_t: int, max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(positions a split, splits) for a cache of T positions: splits of a power-of-two
    multiple of block_t, at most ``max_splits`` of them."""
    chunk = max(block_t, triton.next_power_of_2(triton.cdiv(T, max_splits)))
    return chunk, triton.cdiv(T, chunk)


def decode_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                         start: torch.Tensor, scale: float, window: int | None, softcap: float | None,
                         block_t: int = 32, max_splits: int = MAX_SPLITS) -> torch.Tensor:
    """q ``[B, 1, Hq, D]``, k and v ``[B, T, Hk, D]`` (unit stride on D), valid bool
    ``[B, ≥T]``, start a one-element long tensor: ``[B, 1, Hq, D]`` in q's dtype."""
    B, _, Hq, D = q.shape
    T, Hk = k.shape[1], k.shape[2]
    if Hq % Hk:
        raise ValueError(f"decode_attention_fwd: {Hq} query heads do not share {Hk} key heads evenly")
    chunk, n_splits = split_plan(T, block_t, max_splits)
    block_d = max(16, triton.next_power_of_2(D))
    ml = torch.empty(B, Hq, n_splits, 2, dtype=torch.float32, device=q.device)
    acc = torch.empty(B, Hq, n_splits, block_d, dtype=torch.float32, device=q.device)
    _decode_attention_split[(B, Hq, n_splits)](
        q, k, v, valid, start, ml, acc, T, Hq // Hk, D, chunk, n_splits, scale, window or 0, softcap or 0.0,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0), BLOCK_T=block_t, BLOCK_D=block_d,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, num_warps=4)
    o = torch.empty_like(q)
    _decode_attention_combine[(B, Hq)](ml, acc, o, n_splits, D, o.stride(0), o.stride(2),
                                       BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d,
                                       num_warps=4)
    return o
