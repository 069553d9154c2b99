"""Transposed QLoRA projection for the backward: ``dX = Σᵢ dYᵢ·dequant(Wᵢ) + P·A_cat``.

This is the input gradient of ``Yᵢ = X·Wᵢᵀ + sᵢ·(X·Aᵢᵀ)·Bᵢᵀ``:
``dX = Σᵢ dYᵢ·Wᵢ + Σᵢ sᵢ·(dYᵢ·Bᵢ)·Aᵢ``. The caller forms the thin
``P = [s₀·dY₀·B₀ | s₁·dY₁·B₁ | …]`` [M, Σr] (it needs ``dYᵢ·Bᵢ`` for dA anyway) and
``A_cat = [A₀; A₁; …]`` [Σr, K]; the epilogue adds ``P·A_cat`` with one small dot.
Up to three (dYᵢ, Wᵢ) pairs are summed along the reduction inside one program (q, k, v
share dX; so do gate and up), so dX is written once.

W [N, K] stays in NF4: the tile [BN (reduction), BK (output columns)] is dequantized in
registers each step, exactly as in the forward kernel. ``W_AS_A`` computes
``dXᵀ = Wᵀ·dYᵀ`` so the dequantized tile is the dot's register operand on Hopper.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_configs import MatmulConfig
from .nf4_tile import lut_for, nf4_tile, use_asm


@triton.jit
def _accumulate_pair(
    acc, dy_ptr, stride_dym, rm, w_ptr, am_ptr, nam_ptr, off, N, K, k0,
    code_ptr, ncode_ptr,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_N: tl.constexpr, W_AS_A: tl.constexpr, PREC: tl.constexpr, ASM: tl.constexpr,
    LUT: tl.constexpr,
):
    """acc += dY[rows, :] · W[:, k0:k0+BK] over all N in steps of BN."""
    offs_n = tl.arange(0, BN)
    cols_b = k0 // 2 + tl.arange(0, BK // 2)
    cols_a = k0 // 64 + tl.arange(0, BK // 64)
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * (K // 2) + cols_b[None, :]
    blk = offs_n[:, None] * (K // 64) + cols_a[None, :]
    for n_start in range(0, N, BN):
        if EVEN_N:
            dy = tl.load(dy_ptrs)
        else:
            # Rows past N are clamped to a valid row; the zeroed dY columns cancel them.
            rn = tl.minimum(n_start + offs_n, N - 1)
            w_ptrs = w_ptr + rn[:, None] * (K // 2) + cols_b[None, :]
            blk = rn[:, None] * (K // 64) + cols_a[None, :]
            dy = tl.load(dy_ptrs, mask=(n_start + offs_n < N)[None, :], other=0.0)
        w = nf4_tile(w_ptrs, blk, am_ptr, nam_ptr, ncode_ptr, code_ptr, off,
                     BN, BK, DOUBLE_QUANT, NESTED_BLOCK, dy.dtype, ASM, LUT)
        if W_AS_A:
            acc = tl.dot(tl.trans(w), tl.trans(dy), acc, input_precision=PREC)
        else:
            acc = tl.dot(dy, w, acc, input_precision=PREC)
        dy_ptrs += BN
        if EVEN_N:
            w_ptrs += BN * (K // 2)
            blk += BN * (K // 64)
    return acc


@triton.jit(do_not_specialize=["n0", "n1", "n2", "RT", "M"])
def _nf4_t_kernel(
    dx_ptr, p_ptr, stride_pm, a_ptr, RT,
    code_ptr, ncode_ptr,
    dy0, sdy0, w0, am0, nam0, off0, n0,
    dy1, sdy1, w1, am1, nam1, off1, n1,
    dy2, sdy2, w2, am2, nam2, off2, n2,
    M, K,
    NUM_SEG: tl.constexpr, HAS_LORA: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, W_AS_A: tl.constexpr, PREC: tl.constexpr,
    ASM: tl.constexpr = False, LUT: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_k = K // BK
    per_group = GROUP_M * tiles_k
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_k = (pid % per_group) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    rm = tl.minimum(offs_m, M - 1).to(tl.int64)
    k0 = pid_k * BK
    if W_AS_A:
        acc = tl.zeros((BK, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BK), dtype=tl.float32)
    acc = _accumulate_pair(acc, dy0, sdy0, rm, w0, am0, nam0, off0, n0, K, k0, code_ptr, ncode_ptr,
                           DOUBLE_QUANT, NESTED_BLOCK, BM, BN, BK, EVEN_N, W_AS_A, PREC, ASM, LUT)
    if NUM_SEG > 1:
        acc = _accumulate_pair(acc, dy1, sdy1, rm, w1, am1, nam1, off1, n1, K, k0, code_ptr, ncode_ptr,
                               DOUBLE_QUANT, NESTED_BLOCK, BM, BN, BK, EVEN_N, W_AS_A, PREC, ASM, LUT)
    if NUM_SEG > 2:
        acc = _accumulate_pair(acc, dy2, sdy2, rm, w2, am2, nam2, off2, n2, K, k0, code_ptr, ncode_ptr,
                               DOUBLE_QUANT, NESTED_BLOCK, BM, BN, BK, EVEN_N, W_AS_A, PREC, ASM, LUT)
    if W_AS_A:
        acc = tl.trans(acc)

    offs_k = k0 + tl.arange(0, BK)
    if HAS_LORA:
        offs_r = tl.arange(0, BR)
        r_mask = offs_r < RT
        p = tl.load(p_ptr + rm[:, None] * stride_pm + offs_r[None, :], mask=r_mask[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None], other=0.0)
        acc = tl.dot(p, a, acc, input_precision=PREC)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def nf4_matmul_t(
    grads: list[torch.Tensor],
    weights: list,
    cfg: MatmulConfig,
    *,
    p: torch.Tensor | None = None,
    a_cat: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σᵢ grads[i]·dequant(weights[i]) + p·a_cat`` as a new [M, K] tensor in grads' dtype.

    ``grads[i]`` [M, N_i] with unit column stride; ``weights[i]`` NF4 of shape [N_i, K];
    ``p`` [M, R] and ``a_cat`` [R, K] contiguous in grads' dtype, or both None.
    ``cfg.bk`` (output column tile) must divide K.
    """
    nseg = len(weights)
    if not 1 <= nseg <= 3 or len(grads) != nseg:
        raise ValueError(f"nf4_matmul_t takes 1 to 3 (grad, weight) pairs, got {len(grads)} and {nseg}")
    M = grads[0].shape[0]
    K = int(weights[0].shape[1])
    if K % cfg.bk or K % 64 or any(int(w.shape[1]) != K for w in weights):
        raise ValueError(f"nf4_matmul_t: the weights must share K = {K}, a multiple of 64 and of the "
                         f"tile's bk = {cfg.bk}")
    dx = torch.empty((M, K), device=grads[0].device, dtype=grads[0].dtype)
    args = []
    for i in range(3):
        g, w = (grads[i], weights[i]) if i < nseg else (grads[0], weights[0])
        nested = w.nested_absmax if w.nested_absmax is not None else w.absmax
        args += [g, g.stride(0), w.packed, w.absmax, nested, float(w.nested_offset or 0.0), int(w.shape[0])]
    has_lora = p is not None and a_cat is not None and p.shape[1] > 0
    if has_lora:
        p = p.to(dx.dtype)
        a_cat = a_cat.to(dx.dtype).contiguous()
    rt = int(p.shape[1]) if has_lora else 0
    w0 = weights[0]
    even_n = all(int(w.shape[0]) % cfg.bn == 0 for w in weights)
    grid = (triton.cdiv(M, cfg.bm) * (K // cfg.bk),)
    _nf4_t_kernel[grid](
        dx, p if has_lora else dx, p.stride(0) if has_lora else 0, a_cat if has_lora else dx, rt,
        w0.code, w0.nested_code if w0.nested_code is not None else w0.code,
        *args,
        M, K,
        NUM_SEG=nseg, HAS_LORA=has_lora,
        DOUBLE_QUANT=w0.absmax.dtype == torch.uint8, NESTED_BLOCK=int(w0.nested_blocksize or 256),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, BR=max(16, _next_pow2(max(rt, 1))),
        GROUP_M=cfg.group_m, EVEN_N=even_n, W_AS_A=cfg.w_as_a, ASM=use_asm(dx),
        LUT=lut_for(w0, dx, cfg.bn, cfg.bk, cfg.num_warps, cfg.w_as_a),
        PREC="ieee" if dx.dtype == torch.float32 else "tf32",
        **cfg.launch_options(),
    )
    return dx
