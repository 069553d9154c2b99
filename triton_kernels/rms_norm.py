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
                  GEMMA: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # ROWS rows at a time as one [ROWS, BLOCK] tile: every row's loads are in flight
    # before the first reduction, which short (few-row) launches need to reach bandwidth.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < n_cols
    wf = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(0, rows_per_prog, ROWS):
        rows1 = pid * rows_per_prog + i + tl.arange(0, ROWS)
        rows = rows1[:, None]
        m = (rows < n_rows) & cmask
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols, mask=m, other=0.0)
        xf = x.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [ROWS]
        tl.store(R + rows1, r, mask=rows1 < n_rows)
        r2 = r[:, None]
        if GEMMA:
            y = xf * r2 * (1.0 + wf)
        else:
            y = wf * (xf * r2).to(x.dtype).to(tl.float32)
        tl.store(Y + r64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd(DY, X, W, R, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_prog,
                  GEMMA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < n_cols
    wf = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GEMMA:
        wf = wf + 1.0
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog, ROWS):
        rows = pid * rows_per_prog + i + tl.arange(0, ROWS)[:, None]
        m = (rows < n_rows) & cmask
        r64 = rows.to(tl.int64)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + r64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(R + rows, mask=rows < n_rows, other=0.0)  # [ROWS, 1]
        xh = x * r
        g = dy * wf
        dx = r * (g - xh * (tl.sum(g * xh, axis=1)[:, None] / n_cols))
        tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
        if WEIGHT_GRAD:
            dw += dy * xh  # masked rows load zeros: they add nothing
    if WEIGHT_GRAD:
        tl.store(DW + pid * n_cols + cols, tl.sum(dw, axis=0)[None, :], mask=cmask)


def _launch_shape(n_rows: int, device: torch.device, weight_grad: bool = False, rows: int = 1) -> tuple[int, int]:
    """(programs, rows per program, a multiple of ``rows``). A few rows a program keeps the
    most loads in flight; when the weight trains, fewer programs keep the partial dw sums small."""
    if device.type != "cuda":
        progs = min(n_rows, 4)
    elif weight_grad:
        progs = min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count * 4)
    else:
        progs = triton.cdiv(n_rows, rows)
    progs = max(progs, 1)
    return progs, triton.cdiv(triton.cdiv(n_rows, progs), rows) * rows


# (rows per tile, warps) by the row length. The sweep in bench_kernels.py (H200, H = 4096,
# 2026-12-01) found one row a program with 8 warps fastest at 4096 and 16384 tokens (2 or 4
# rows a tile: 1-7 points slower), so several rows a tile is only an option.
def _tile(block: int) -> tuple[int, int]:
    return 1, (4 if block <= 1024 else 8 if block <= 4096 else 16)


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                     tile: tuple[int, int] | None = None):
    """x2d [rows, H] (unit stride on H) -> (y [rows, H] in x's dtype, r [rows] fp32).
    tile: (rows per tile, warps); None picks by the row length (the benchmark sweeps it)."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    r = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    rows, warps = tile or _tile(block)
    progs, per = _launch_shape(n_rows, x2d.device, rows=rows)
    _rms_norm_fwd[(progs,)](x2d, y, weight, r, x2d.stride(0), y.stride(0), n_rows, n_cols, eps, per,
                            GEMMA=gemma, BLOCK=block, ROWS=rows, num_warps=warps)
    return y, r


def rms_norm_backward(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, gemma: bool,
                      weight_grad: bool, tile: tuple[int, int] | None = None):
    """-> (dx [rows, H] in x's dtype, dw [H] fp32 or None)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    block = triton.next_power_of_2(n_cols)
    rows, warps = tile or _tile(block)
    progs, per = _launch_shape(n_rows, x2d.device, weight_grad, rows=rows)
    dw_part = torch.empty((progs, n_cols), dtype=torch.float32, device=x2d.device) if weight_grad else dx
    _rms_norm_bwd[(progs,)](dy, x2d, weight, r, dx, dw_part, dy.stride(0), x2d.stride(0), dx.stride(0), n_rows,
                            n_cols, per, GEMMA=gemma, WEIGHT_GRAD=weight_grad, BLOCK=block, ROWS=rows,
                            num_warps=warps)
    return dx, (dw_part.sum(0) if weight_grad else None)
