"""RMSNorm forward and backward kernels.

Forward, per row x of length H, with r = 1/sqrt(mean(x²) + eps):
    offset 0 (Llama):  y = w · cast(x·r)        (normalized value cast to x's dtype first)
    offset 1 (Gemma):  y = cast(x·r·(1 + w))    (all fp32, one cast)
Saved: x and r (one fp32 per row), never the normalized activations.

Backward (the casts pass gradients through unchanged). With x̂ = x·r and the weight
factor w' = w (Llama) or 1 + w (Gemma), g = dy·w' :
    dx = r · (g − x̂ · mean(g·x̂))          (d x̂/dx = r(I − x̂x̂ᵀ/H))
    dw = Σ_rows dy · x̂                     (partial sums per program, reduced in torch)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, Y, W, R, stride_x, stride_y, n_rows, n_cols, eps, rows_per_prog,
                  GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0)
    wf = w.to(tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        if row < n_rows:
            x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=cmask, other=0.0)
            xf = x.to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
            tl.store(R + row, r)
            if GEMMA:
                y = xf * r * (1.0 + wf)
            else:
                y = wf * (xf * r).to(x.dtype).to(tl.float32)
            tl.store(Y + row.to(tl.int64) * stride_y + cols, y.to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _rms_norm_bwd(DY, X, W, R, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_prog,
                  GEMMA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    wf = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GEMMA:
        wf = wf + 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        if row < n_rows:
            r64 = row.to(tl.int64)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
            x = tl.load(X + r64 * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
            r = tl.load(R + row)
            xh = x * r
            g = dy * wf
            dx = r * (g - xh * (tl.sum(g * xh, axis=0) / n_cols))
            tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cmask)
            if WEIGHT_GRAD:
                dw += dy * xh
    if WEIGHT_GRAD:
        tl.store(DW + pid * n_cols + cols, dw, mask=cmask)


def _launch_shape(n_rows: int, device: torch.device, weight_grad: bool = False) -> tuple[int, int]:
    """(programs, rows per program). One row a program keeps the most loads in flight;
    when the weight trains, fewer programs keep the partial dw sums small."""
    if device.type != "cuda":
        progs = min(n_rows, 4)
    elif weight_grad:
        progs = min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count * 4)
    else:
        progs = min(n_rows, 1 << 20)
    progs = max(progs, 1)
    return progs, triton.cdiv(n_rows, progs)


# Warps by the row length. One row a program: a sweep on an H200 (2026-12-01, H = 4096) of
# 2 and 4 rows a program as one tile, with 8 or 16 warps, was 0.4-8 points of bandwidth slower.
def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                     num_warps: int | None = None):
    """x2d [rows, H] (unit stride on H) -> (y [rows, H] in x's dtype, r [rows] fp32).
    num_warps: None picks by the row length (the benchmark sweeps it)."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    r = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    progs, per = _launch_shape(n_rows, x2d.device)
    _rms_norm_fwd[(progs,)](x2d, y, weight, r, x2d.stride(0), y.stride(0), n_rows, n_cols, eps, per,
                            GEMMA=gemma, BLOCK=block, num_warps=num_warps or _warps(block))
    return y, r


def rms_norm_backward(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, gemma: bool,
                      weight_grad: bool, num_warps: int | None = None):
    """-> (dx [rows, H] in x's dtype, dw [H] fp32 or None)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    progs, per = _launch_shape(n_rows, x2d.device, weight_grad)
    dw_part = torch.empty((progs, n_cols), dtype=torch.float32, device=x2d.device) if weight_grad else dx
    _rms_norm_bwd[(progs,)](dy, x2d, weight, r, dx, dw_part, dy.stride(0), x2d.stride(0), dx.stride(0), n_rows,
                            n_cols, per, GEMMA=gemma, WEIGHT_GRAD=weight_grad, BLOCK=block,
                            num_warps=num_warps or _warps(block))
    return dx, (dw_part.sum(0) if weight_grad else None)
