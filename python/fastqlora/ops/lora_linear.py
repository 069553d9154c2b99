"""One projection with a frozen base and an optional LoRA branch:
``y = x·Wᵀ + b + s·(x_l·Aᵀ)·Bᵀ`` where ``W`` is 16-bit or NF4 and ``x_l`` is the
LoRA branch's input (``x`` itself, or ``dropout(x)``).

Backward, by hand (XA = x_l·Aᵀ, G = dY·B):
    dx   = dY·W                 (W re-dequantized, never saved in 16-bit)
    dx_l = s·G·A
    dA   = s·Gᵀ·x_l,   dB = s·dYᵀ·XA
Saved: x_l and XA (thin) when the adapter trains; for NF4 only the 4-bit weight.
This is the plain path that works everywhere; the fused NF4 kernels replace it on
CUDA where they are faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import NF4Tensor

Weight = torch.Tensor | NF4Tensor


def _dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Tensor):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, bias, lora_A, lora_B, weight, scale):
        dtype = x.dtype
        w = _dense(weight, dtype)
        y = F.linear(x, w, bias)
        xa = None
        if lora_A is not None:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            xa = F.linear(x_lora, a)
            y = y + F.linear(xa, b) * scale
        ctx.weight, ctx.scale = weight, scale
        ctx.has_lora = lora_A is not None
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(x_lora if ctx.has_lora else None, xa, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, xa, lora_A, lora_B = ctx.saved_tensors
        dtype = dy.dtype
        dx = dx_l = dA = dB = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _dense(ctx.weight, dtype)
        if ctx.has_lora:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            g = dy @ b  # [.., r]
            if ctx.needs_input_grad[1]:
                dx_l = (g @ a) * ctx.scale
            g2, x2 = g.reshape(-1, g.shape[-1]), x_lora.reshape(-1, x_lora.shape[-1])
            if ctx.needs_input_grad[3]:
                dA = ((g2.t() @ x2) * ctx.scale).to(lora_A.dtype)
            if ctx.needs_input_grad[4]:
                dB = ((dy.reshape(-1, dy.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1])) * ctx.scale).to(lora_B.dtype)
        if ctx.bias_grad:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dx_l, db, dA, dB, None, None


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + b (+ s·(x_lora·Aᵀ)·Bᵀ)``; ``x_lora`` defaults to ``x``."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if x.shape[-1] != (weight.shape[1] if isinstance(weight, NF4Tensor) else weight.shape[-1]):
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects "
                         f"{weight.shape[1] if isinstance(weight, NF4Tensor) else weight.shape[-1]}")
    if x_lora is None:
        x_lora = x
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Under autocast (Trainer's bf16=True), compute in the autocast dtype explicitly:
        # the Function's own matmuls must not be re-cast op by op.
        dt = torch.get_autocast_dtype(device)
        x, x_lora = x.to(dt), x_lora.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return _LoraLinear.apply(x, x_lora, bias, lora_A, lora_B, weight, scale)
    return _LoraLinear.apply(x, x_lora, bias, lora_A, lora_B, weight, scale)
