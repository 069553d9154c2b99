"""Decode-shape NF4 product without tensor cores: ``y = x·dequant(W)ᵀ + s·xa·Bᵀ (+ bias)``, one row.

At one token the product is bound by reading the 4-bit weight, and every instruction per
weight counts (an H100 streams ~6·10¹² weights/s but issues only ~3·10¹³ simple
operations/s). This kernel never builds a 16-bit weight: it factors the absmax out of
each 64-weight block,

    y[n] = Σ_b absmax[n, b] · Σ_{k ∈ b} code[q[n, k]] · x[k],

so each weight costs a nibble extract, a table lookup and one FMA, in fp32 with the exact
fp32 codes. The high and low nibbles of a byte multiply the even and odd entries of x,
so nothing is interleaved. Triton pipelines only loads that feed a dot, so bytes in
flight come from many small programs instead: K is split over ``SPLIT_K`` programs,
several per SM, whose partial rows the last of them sums (as in nf4_matmul.py). (Several rows cost one more FMA each and a 3-D
reduction that Triton spreads across lanes, so from two rows on the tensor-core kernel
in nf4_matmul.py is the better tool.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_configs import GemvConfig
from .split_k import split_counters, split_k_sum


@triton.jit(do_not_specialize=["N", "R"])
def _nf4_gemv_kernel(
    x_ptr, xa_ptr, ws_ptr, cnt_ptr,
    w_ptr, am_ptr, nam_ptr, off, code_ptr, ncode_ptr,
    b_ptr, bias_ptr, scale, y_ptr,
    N, K, R,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    BN: tl.constexpr, BR: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)

    # One 64-weight absmax block per row per step.
    k_tiles = K // 64
    if SPLIT_K == 1:
        k_first = 0
        k_count = k_tiles
    else:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_first = tl.program_id(1) * per_split
        k_count = tl.minimum(per_split, k_tiles - k_first)

    w_ptrs = w_ptr + rn[:, None] * (K // 2) + (k_first * 32 + tl.arange(0, 32))[None, :]
    blk = rn * (K // 64) + k_first
    # x's 64-block viewed as [32, 2]: even and odd entries meet the high and low nibbles.
    x_ptrs = x_ptr + k_first * 64 + 2 * tl.arange(0, 32)[:, None] + tl.arange(0, 2)[None, :]

    acc = tl.zeros((BN,), dtype=tl.float32)
    for _ in range(0, k_count):
        b = tl.load(w_ptrs).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        xe, xo = tl.split(tl.load(x_ptrs).to(tl.float32))
        part = tl.sum(hi * tl.reshape(xe, (1, 32)) + lo * tl.reshape(xo, (1, 32)), axis=1)
        if DOUBLE_QUANT:
            a8 = tl.load(am_ptr + blk).to(tl.int32)
            amax = tl.load(ncode_ptr + a8) * tl.load(nam_ptr + blk // NESTED_BLOCK) + off
        else:
            amax = tl.load(am_ptr + blk)
        acc += part * amax
        w_ptrs += 32
        blk += 1
        x_ptrs += 64

    # Split K: partial rows to the workspace; the tile's last program sums them in split
    # order and finishes (see nf4_matmul.py).
    last = True
    if SPLIT_K > 1:
        acc, last = split_k_sum(acc, ws_ptr, tl.arange(0, BN), cnt_ptr, BN, SPLIT_K)
    if last:
        if HAS_LORA:
            offs_r = tl.arange(0, BR)
            r_mask = offs_r < R
            xa = tl.load(xa_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + rn[:, None] * R + offs_r[None, :], mask=r_mask[None, :], other=0.0)
            acc += scale * tl.sum(bt.to(tl.float32) * xa[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def nf4_gemv(
    x: torch.Tensor,
    w,
    cfg: GemvConfig,
    *,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·dequant(w)ᵀ + scale·xa·lora_bᵀ + bias`` for one row x [1, K] (unit stride);
    returns [1, N] in x's dtype. ``xa`` [1, r] and ``lora_b`` [N, r] (contiguous) in x's
    dtype, or None; K a multiple of 64."""
    M, K = x.shape
    N = int(w.shape[0])
    if M != 1:
        raise ValueError(f"nf4_gemv computes one row; got x with {M} rows (use nf4_matmul_fwd)")
    if K % 64 or int(w.shape[1]) != K:
        raise ValueError(f"nf4_gemv: x has K = {K} and the weight {int(w.shape[1])} columns; they must match "
                         f"and be a multiple of 64")
    split = cfg.split_k
    y = torch.empty((1, N), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(N, cfg.bn)
    if split > 1:
        ws = torch.empty(split * tiles * cfg.bn, device=x.device, dtype=torch.float32)
        cnt = split_counters(x.device, tiles)
    else:
        ws, cnt = x, x  # never read
    has_lora = xa is not None and lora_b is not None
    r = int(lora_b.shape[1]) if has_lora else 0
    nested = w.nested_absmax if w.nested_absmax is not None else w.absmax
    _nf4_gemv_kernel[(tiles, split)](
        x, xa if has_lora else x, ws, cnt,
        w.packed, w.absmax, nested, float(w.nested_offset or 0.0), w.code,
        w.nested_code if w.nested_code is not None else w.code,
        lora_b if has_lora else x, bias if bias is not None else x, float(scale), y,
        N, K, r,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        DOUBLE_QUANT=w.absmax.dtype == torch.uint8, NESTED_BLOCK=int(w.nested_blocksize or 256),
        BN=cfg.bn, BR=max(1, 1 << max(0, (r - 1).bit_length())), SPLIT_K=split,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return y
