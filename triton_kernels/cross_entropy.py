"""Cross-entropy of a chunk of logits, with its gradient written over the logits.

For a row of logits z (after the optional soft-cap z = c·tanh(z₀/c)) and label y:
    loss = lse(z) − z_y,            lse(z) = log Σ_j exp(z_j)
    dloss/dz_j = softmax(z)_j − [j = y]
    dloss/dz₀_j = dloss/dz_j · (1 − tanh²(z₀_j/c))        (through the cap)
A row whose label is the ignore index has loss 0 and gradient 0. The kernel makes two
passes over the row: the running max and sum (online softmax) for lse, then the
gradient, scaled by the reduction factor (1/N for a mean), stored in place of the
logits in their own dtype. The chunk's logits never need a second buffer, and the
full tokens × vocabulary matrix never exists (the caller walks the rows in chunks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _ce_fwd_bwd(Z, stride_z, LABELS, LOSS, LSE, n_cols, ignore_index, scale, SCALE, softcap,
                HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    zrow = Z + row.to(tl.int64) * stride_z
    label = tl.load(LABELS + row).to(tl.int32)
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    z_label = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(zrow + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_CAP:
            z = tl.where(mask, softcap * _tanh(z / softcap), -float("inf"))
        z_label += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = label != ignore_index
    tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        if SCALE_ON_DEVICE:  # a count the host never read (a CUDA graph may replay it)
            scale = tl.load(SCALE)
        g_scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z0 = tl.load(zrow + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                t = _tanh(z0 / softcap)
                z = softcap * t
            else:
                z = z0
            g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_CAP:
                g = g * (1.0 - t * t)
            tl.store(zrow + cols, (g * g_scale).to(Z.dtype.element_ty), mask=mask)


def ce_chunk_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float | torch.Tensor,
              softcap: float | None, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) of ``logits [rows, V]`` (unit stride on V); with ``write_grad``
    the logits are overwritten by ``scale · dloss/dlogits``. ``scale``: a number, or a
    one-element fp32 tensor on the logits' device, read by the kernel."""
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(n_cols), 4096 if logits.is_cuda else 1024)
    on_device = isinstance(scale, torch.Tensor)
    _ce_fwd_bwd[(rows,)](logits, logits.stride(0), labels, loss, lse, n_cols, ignore_index,
                         1.0 if on_device else float(scale), scale if on_device else loss,
                         float(softcap or 1.0), HAS_CAP=softcap is not None, WRITE_GRAD=write_grad,
                         SCALE_ON_DEVICE=on_device, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, lse
