"""Flash attention forward and backward for packed (variable-length) sequences.

Layout: q ``[T, Hq, D]``, k and v ``[T, Hk, D]`` over T flattened tokens, split into
independent sequences by ``cu_seqlens`` (int32 ``[n + 1]``); query head h reads KV
head ``h // (Hq/Hk)`` without K/V ever being repeated. Masks: causal (key ≤ query),
sliding window (query − key < W), soft-cap ``c·tanh(s/c)`` on the scaled scores.
Fully masked blocks are never visited: the key range of a query block stops at the
diagonal and starts at the window's edge; blocks wholly inside the allowed region
run without mask arithmetic, only the diagonal and ragged blocks are masked.

Forward (online softmax, base-2 exponentials): saves O and the row log-sum-exp
lse = log Σ_j exp(s_j) (natural log), nothing of size T × T.

Backward, with P = exp(S − lse) recomputed block by block and Δ = rowsum(dO ⊙ O)
from a small preprocessing kernel:
    dV = Pᵀ·dO
    dP = dO·Vᵀ,   dS = P ⊙ (dP − Δ)
    soft-cap: S = c·tanh(S₀/c) with S₀ = scale·QKᵀ, so dS₀ = dS ⊙ (1 − tanh²(S₀/c))
    dQ = scale·dS₀·K,   dK = scale·dS₀ᵀ·Q
dK/dV are accumulated per key block over every query block and every query head of its
group (no atomics); dQ per query block over its key blocks.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _scores(q, k, offs_m, offs_n, seqlen, qk_scale, softcap, window,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, MASKED: tl.constexpr,
            PRECISION: tl.constexpr):
    """log2-domain scores [M, N] of q [M, D] against k [N, D], masked entries -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_CAP:
        s = softcap * _tanh(s * qk_scale / softcap) * 1.4426950408889634
    else:
        s = s * (qk_scale * 1.4426950408889634)
    if MASKED:
        ok = (offs_n[None, :] < seqlen) & (offs_m[:, None] < seqlen)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & ((offs_m[:, None] - offs_n[None, :]) < window)
        s = tl.where(ok, s, -float("inf"))
    return s


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, seqlen, lo, hi, qk_scale, softcap,
               window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n < seqlen)[:, None]
            k = tl.load(k_ptrs + n0 * stride_kt, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + n0 * stride_vt, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs + n0 * stride_kt)
            v = tl.load(v_ptrs + n0 * stride_vt)
        s = _scores(q, k, offs_m, offs_n, seqlen, qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, MASKED,
                    PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing allowed yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, qk_scale, softcap, window, group,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    if m0 >= seqlen:
        return
    kh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    start64 = start.to(tl.int64)
    q_ptrs = Q + (start64 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < seqlen)[:, None], other=0.0)
    k_ptrs = K + (start64 + offs_n[:, None]) * stride_kt + kh * stride_kh + offs_d[None, :]
    v_ptrs = V + (start64 + offs_n[:, None]) * stride_vt + kh * stride_vh + offs_d[None, :]
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, m0 - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, seqlen, lo, hi,
                                   qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True, BLOCK_N, PRECISION)
    else:
        # blocks wholly below the diagonal (causal) or wholly inside the sequence: no masks
        full = (seqlen // BLOCK_N) * BLOCK_N
        if CAUSAL:
            full = m0
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, seqlen, 0, full,
                                   qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, False, BLOCK_N, PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, seqlen, full, hi,
                                   qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True, BLOCK_N, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + (start64 + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < seqlen)[:, None])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + h * stride_lh + start64 + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, n_tokens, stride_ot, stride_oh, stride_dt, stride_dh, stride_lh,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    mask = (t < n_tokens)[:, None]
    t64 = t.to(tl.int64)
    o = tl.load(O + t64[:, None] * stride_ot + h * stride_oh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + t64[:, None] * stride_dt + h * stride_dh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_lh + t64, tl.sum(o * do, axis=1), mask=t < n_tokens)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, seqlen, lo, hi,
                qk_scale, softcap, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if MASKED:
            row_ok = offs_m < seqlen
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :])
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # transposed scores [N, M]: keys of this block against the query block
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_CAP:
            t = _tanh(s / softcap)
            s = softcap * t
        p = tl.exp2(s * 1.4426950408889634 - lse[None, :] * 1.4426950408889634)
        if MASKED:
            ok = (offs_m[None, :] < seqlen) & (offs_n[:, None] < seqlen)
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :])
            if HAS_WINDOW:
                ok = ok & ((offs_m[None, :] - offs_n[:, None]) < window)
            p = tl.where(ok, p, 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        if HAS_CAP:
            ds = ds * (1.0 - t * t)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU, qk_scale, softcap, window, group,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1)
    kh = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    if n0 >= seqlen:
        return
    start64 = start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n < seqlen)[:, None]
    k = tl.load(K + (start64 + offs_n[:, None]) * stride_kt + kh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (start64 + offs_n[:, None]) * stride_vt + kh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = n0  # queries before this key block never see it
    hi = seqlen
    if HAS_WINDOW:
        hi = tl.minimum(seqlen, n0 + BLOCK_N + window - 1)
    for g in range(0, group):
        h = kh * group + g
        q_base = Q + start64 * stride_qt + h * stride_qh
        do_base = DO + start64 * stride_dot + h * stride_doh
        lse_base = LSE + h * stride_lh + start64
        delta_base = DELTA + h * stride_lh + start64
        if not SPLIT:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 seqlen, lo, hi, qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True, BLOCK_M,
                                 HEAD_DIM, PRECISION)
        else:
            # diagonal blocks masked, the query blocks wholly after this key block not, the ragged end masked
            diag_end = tl.minimum(n0 + BLOCK_N, seqlen)
            full_end = tl.maximum(diag_end, (seqlen // BLOCK_M) * BLOCK_M)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 seqlen, lo, diag_end, qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True,
                                 BLOCK_M, HEAD_DIM, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 seqlen, diag_end, full_end, qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP,
                                 False, BLOCK_M, HEAD_DIM, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 seqlen, full_end, hi, qk_scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True,
                                 BLOCK_M, HEAD_DIM, PRECISION)
    dk_ptrs = DK + (start64 + offs_n[:, None]) * stride_dkt + kh * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + (start64 + offs_n[:, None]) * stride_dvt + kh * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, (dk * qk_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen, lo, hi, qk_scale, softcap,
              window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n < seqlen)[:, None]
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_CAP:
            t = _tanh(s / softcap)
            s = softcap * t
        p = tl.exp2(s * 1.4426950408889634 - lse[:, None] * 1.4426950408889634)
        if MASKED:
            ok = (offs_n[None, :] < seqlen) & (offs_m[:, None] < seqlen)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                ok = ok & ((offs_m[:, None] - offs_n[None, :]) < window)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_CAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, CU, qk_scale, softcap, window, group,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh, stride_lh,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    if m0 >= seqlen:
        return
    start64 = start.to(tl.int64)
    kh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + (start64 + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    do = tl.load(DO + (start64 + offs_m[:, None]) * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * stride_lh + start64 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * stride_lh + start64 + offs_m, mask=row_ok, other=0.0)
    k_base = K + start64 * stride_kt + kh * stride_kh
    v_base = V + start64 * stride_vt + kh * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, m0 - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen, lo, hi, qk_scale,
                       softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    else:
        full = (seqlen // BLOCK_N) * BLOCK_N
        if CAUSAL:
            full = m0
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen, 0, full, qk_scale,
                       softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, False, BLOCK_N, HEAD_DIM, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen, full, hi, qk_scale,
                       softcap, window, CAUSAL, HAS_WINDOW, HAS_CAP, True, BLOCK_N, HEAD_DIM, PRECISION)
    tl.store(DQ + (start64 + offs_m[:, None]) * stride_dqt + h * stride_dqh + offs_d[None, :],
             (dq * qk_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _config(head_dim: int, device: torch.device) -> dict[str, int]:
    """Block shapes, warps and pipeline stages per head dim. Forward: BLOCK_M a multiple
    of BLOCK_N; backward: BLOCK_N (keys) a multiple of BLOCK_M (queries), as the unmasked
    ranges assume. ``FQ_FLASH_CFG`` (JSON) overrides entries, for tuning sweeps."""
    if device.type != "cuda":
        cfg = dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=32, dq_m=16, dq_n=16, fwd_warps=4, fwd_stages=1,
                   bwd_warps=4, bwd_stages=1)
    elif head_dim <= 64:
        cfg = dict(fwd_m=128, fwd_n=64, bwd_m=64, bwd_n=128, dq_m=128, dq_n=64, fwd_warps=4, fwd_stages=3,
                   bwd_warps=4, bwd_stages=2)
    elif head_dim <= 128:
        # from benchmarks/bench_flash_attention.py --sweep on an H100 (results/flash_sweep.json);
        # on Hopper the dK/dV kernel unpipelined (--sweep-dkdv on an H200, 2026-12-01,
        # results/flash_dkdv_sweep_h200.json: 327 -> 343 TFLOP/s fwd+bwd at 8192): its
        # 128 x 128 fp32 dK and dV accumulators leave no registers for a second stage.
        cfg = dict(fwd_m=128, fwd_n=64, bwd_m=64, bwd_n=128, dq_m=128, dq_n=64, fwd_warps=8, fwd_stages=3,
                   bwd_warps=8, bwd_stages=3, dq_warps=8, dq_stages=3)
        if torch.cuda.get_device_capability(device)[0] >= 9:
            cfg["bwd_stages"] = 1
    else:
        cfg = dict(fwd_m=64, fwd_n=32, bwd_m=32, bwd_n=64, dq_m=64, dq_n=32, fwd_warps=8, fwd_stages=1,
                   bwd_warps=8, bwd_stages=1)
    override = os.environ.get("FQ_FLASH_CFG")
    if override:
        cfg.update(json.loads(override))
    return cfg


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attn_forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap):
    """q [T, Hq, D], k/v [T, Hk, D] (unit stride on D) -> (o [T, Hq, D], lse [Hq, T] fp32)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    cfg = _config(D, q.device)
    o = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max_seqlen, cfg["fwd_m"]), cu_seqlens.numel() - 1, Hq)
    _attn_fwd[grid](q, k, v, o, lse, cu_seqlens, scale, float(softcap or 1.0), int(window or 0), Hq // Hk,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0),
                    o.stride(1), lse.stride(0), CAUSAL=causal, HAS_WINDOW=window is not None,
                    HAS_CAP=softcap is not None, BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], HEAD_DIM=D,
                    PRECISION=_precision(q.dtype), num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return o, lse


def flash_attn_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, causal, window, softcap):
    """-> (dq, dk, dv) in the layouts of q, k, v."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    cfg = _config(D, q.device)
    delta = torch.empty_like(lse)
    blk = 64 if q.is_cuda else 16
    _attn_bwd_delta[(triton.cdiv(T, blk), Hq)](o, do, delta, T, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
                                               delta.stride(0), BLOCK=blk, HEAD_DIM=D)
    dq = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((T, Hk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((T, Hk, D), dtype=v.dtype, device=q.device)
    common = dict(CAUSAL=causal, HAS_WINDOW=window is not None, HAS_CAP=softcap is not None, HEAD_DIM=D,
                  PRECISION=_precision(q.dtype))
    n_seq = cu_seqlens.numel() - 1
    cap, win = float(softcap or 1.0), int(window or 0)
    _attn_bwd_dkdv[(triton.cdiv(max_seqlen, cfg["bwd_n"]), n_seq, Hk)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, scale, cap, win, Hq // Hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        BLOCK_M=cfg["bwd_m"], BLOCK_N=cfg["bwd_n"], SPLIT=causal and window is None, num_warps=cfg["bwd_warps"],
        num_stages=cfg["bwd_stages"], **common)
    _attn_bwd_dq[(triton.cdiv(max_seqlen, cfg["dq_m"]), n_seq, Hq)](
        q, k, v, do, dq, lse, delta, cu_seqlens, scale, cap, win, Hq // Hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0), BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"],
        num_warps=cfg.get("dq_warps", cfg["bwd_warps"]), num_stages=cfg.get("dq_stages", cfg["bwd_stages"]), **common)
    return dq, dk, dv
