"""LoRA projections over a frozen base weight (NF4 or dense), with a hand-written backward.

``y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ`` (PEFT's LoRA: A [r, in], B [out, r]).
:func:`lora_linear` is one projection, :func:`lora_qkv` three that read the same x (their
A matrices concatenated into one thin product, the three base products in one launch),
:func:`lora_o` the output projection. A or B None means no adapter.

Fast path (``dropout == 0``): x·Aᵀ is a thin [M, Σr] product; the LoRA term rides in the
epilogue of the base product, and dX gets its LoRA term in the epilogue of the transposed
product. With ``dropout > 0`` (slower path, more memory): each projection draws its own
mask as PEFT does, its dropped input is saved, and ``(dY·B)·A`` flows back through the
dropout by autograd. Biases are added in the epilogue; their gradient is ``ΣdY``.
Dropout is applied whenever ``dropout > 0``: pass 0 in evaluation.

The adapters may be fp32 (PEFT's default) while x is bf16: the products run in x's dtype,
and dA, dB come back in the adapters' own dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .dispatch import current_backend
from .dropout import lora_dropout
from ..quant import dequantize_nf4_reference
from .nf4_linear import frozen_matmul, frozen_matmul_t, is_nf4, out_features


@dataclass
class LoraProj:
    """One projection: frozen ``weight`` [out, in] (NF4 or dense), optional frozen or
    trainable ``bias`` [out], adapter ``lora_A`` [r, in] and ``lora_B`` [out, r]."""

    weight: Any
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scale: float = 1.0
    dropout: float = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None and self.lora_B is not None


def check_proj(p: LoraProj, K: int) -> None:
    """Raise ValueError unless ``p`` maps K input features and its adapter fits its weight."""
    if int(p.weight.shape[1]) != K:
        raise ValueError(f"weight {tuple(p.weight.shape)} has {int(p.weight.shape[1])} input features, expected {K}")
    if (p.lora_A is None) != (p.lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    if p.has_lora:
        r, n = p.lora_A.shape[0], out_features(p.weight)
        if tuple(p.lora_A.shape) != (r, K) or tuple(p.lora_B.shape) != (n, r):
            raise ValueError(
                f"adapter shapes A {tuple(p.lora_A.shape)}, B {tuple(p.lora_B.shape)} do not fit a "
                f"[{n}, {K}] weight: expected A [r, {K}] and B [{n}, r]"
            )
    if p.bias is not None and tuple(p.bias.shape) != (out_features(p.weight),):
        raise ValueError(f"bias has shape {tuple(p.bias.shape)}, expected ({out_features(p.weight)},)")


def lora_linear_reference(x: torch.Tensor, p: LoraProj) -> torch.Tensor:
    """PEFT's computation in plain torch (autograd does the backward)."""
    w = dequantize_nf4_reference(p.weight, x.dtype) if is_nf4(p.weight) else p.weight.to(x.dtype)
    y = F.linear(x, w, None if p.bias is None else p.bias.to(x.dtype))
    if p.has_lora:
        xl = lora_dropout(x, p.dropout)
        y = y + F.linear(F.linear(xl, p.lora_A.to(x.dtype)), p.lora_B.to(x.dtype)) * p.scale
    return y


class _Projections(torch.autograd.Function):
    """``Yᵢ = X·Wᵢᵀ + sᵢ·(XLᵢ·Aᵢᵀ)·Bᵢᵀ + biasᵢ`` for 1-3 projections sharing X.

    XLᵢ is X itself (no dropout) or its dropped copy. Saved: X, the thin ``XA = [XLᵢ·Aᵢᵀ]``
    [M, Σr], the distinct XLᵢ, the adapters. Backward, with ``Pᵢ = sᵢ·dYᵢ·Bᵢ`` [M, rᵢ]:
      dBᵢ = sᵢ·dYᵢᵀ·XAᵢ        dAᵢ = Pᵢᵀ·XLᵢ        dbiasᵢ = Σ_rows dYᵢ
      dX  = Σᵢ dYᵢ·Wᵢ + Σᵢ Pᵢ·Aᵢ   (one transposed product, LoRA in its epilogue)
    and with dropout dXLᵢ = Pᵢ·Aᵢ goes back through the dropout instead.
    """

    @staticmethod
    def forward(ctx, x, weights, scales, *tensors):
        n = len(weights)
        xls, biases, As, Bs = (list(tensors[i * n:(i + 1) * n]) for i in range(4))
        K = x.shape[-1]
        dtype = x.dtype
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xl2 = [None if xl is None else xl.reshape(-1, K) for xl in xls]
        lora = [a is not None for a in As]
        ranks = [a.shape[0] if a is not None else 0 for a in As]
        cols = [sum(ranks[:i]) for i in range(n)]
        shared = all(xl is None for xl in xls)
        a_cat = xa = None
        if any(lora):
            a_cat = torch.cat([a.to(dtype) for a in As if a is not None])
            if shared:
                xa = x2 @ a_cat.t()
            else:
                xa = torch.cat([(xl2[i] if xl2[i] is not None else x2) @ As[i].to(dtype).t()
                                for i in range(n) if lora[i]], dim=1)
        bs = [b.to(dtype) if b is not None else None for b in Bs]
        bias_c = [b.to(dtype) if b is not None else None for b in biases]
        ys = frozen_matmul(x2, list(weights), xa=xa, lora_b=bs, scales=list(scales), biases=bias_c, xa_cols=cols)
        ctx.weights, ctx.scales, ctx.ranks, ctx.cols, ctx.shared = weights, scales, ranks, cols, shared
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, xa, a_cat, *xl2, *As, *Bs, *biases)
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.weights)
        saved = ctx.saved_tensors
        x2, xa, a_cat = saved[:3]
        xl2, As, Bs, biases = (list(saved[3 + i * n:3 + (i + 1) * n]) for i in range(4))
        need = ctx.needs_input_grad  # x, weights, scales, xls..., biases..., As..., Bs...
        M = x2.shape[0]
        dtype = x2.dtype
        dy2 = [d.reshape(M, d.shape[-1]) for d in dys]
        dy2 = [d if d.stride(-1) == 1 else d.contiguous() for d in dy2]
        lora = [a is not None for a in As]
        p_parts = [torch.mm(dy2[i], Bs[i].to(dtype)).mul_(ctx.scales[i]) for i in range(n) if lora[i]]
        p = torch.cat(p_parts, dim=1) if len(p_parts) > 1 else (p_parts[0] if p_parts else None)

        d_xl = [None] * n
        dx = None
        if need[0]:
            if ctx.shared:
                dx = frozen_matmul_t(dy2, list(ctx.weights), p=p, a_cat=a_cat)
            else:
                dx = frozen_matmul_t(dy2, list(ctx.weights))
                for i in range(n):
                    if lora[i]:
                        term = p[:, ctx.cols[i]:ctx.cols[i] + ctx.ranks[i]] @ As[i].to(dtype)
                        if xl2[i] is None:
                            dx += term
                        else:
                            d_xl[i] = term.view(ctx.x_shape)
            dx = dx.view(ctx.x_shape)

        d_a = [None] * n
        d_b = [None] * n
        if any(lora) and ctx.shared and any(need[3 + 2 * n + i] for i in range(n)):
            da_cat = p.t() @ x2  # all adapters' dA in one thin product
        for i in range(n):
            if not lora[i]:
                continue
            c, r = ctx.cols[i], ctx.ranks[i]
            if need[3 + 2 * n + i]:
                da = da_cat[c:c + r] if ctx.shared else p[:, c:c + r].t() @ (x2 if xl2[i] is None else xl2[i])
                d_a[i] = da.to(As[i].dtype)
            if need[3 + 3 * n + i]:
                d_b[i] = (dy2[i].t() @ xa[:, c:c + r]).mul_(ctx.scales[i]).to(Bs[i].dtype)
        d_bias = [dy2[i].sum(0).to(biases[i].dtype) if need[3 + n + i] else None for i in range(n)]
        return (dx, None, None, *d_xl, *d_bias, *d_a, *d_b)


def _use_reference(x: torch.Tensor, projs: Sequence[LoraProj]) -> bool:
    if current_backend() == "reference":
        return True
    # A trainable dense base weight needs dW, which only autograd's path computes.
    return any(isinstance(p.weight, torch.Tensor) and p.weight.requires_grad for p in projs)


def lora_projections(x: torch.Tensor, projs: Sequence[LoraProj]) -> tuple[torch.Tensor, ...]:
    """The outputs ``[..., out_i]`` of 1-3 LoRA projections of the same ``x`` [..., in]."""
    if not 1 <= len(projs) <= 3:
        raise ValueError(f"lora_projections takes 1 to 3 projections, got {len(projs)}")
    for p in projs:
        check_proj(p, x.shape[-1])
    if _use_reference(x, projs):
        return tuple(lora_linear_reference(x, p) for p in projs)
    xls = [lora_dropout(x, p.dropout) if (p.has_lora and p.dropout > 0) else None for p in projs]
    tensors = (
        xls
        + [p.bias for p in projs]
        + [p.lora_A if p.has_lora else None for p in projs]
        + [p.lora_B if p.has_lora else None for p in projs]
    )
    return _Projections.apply(x, tuple(p.weight for p in projs), tuple(float(p.scale) for p in projs), *tensors)


def lora_linear(
    x: torch.Tensor,
    weight: Any,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(dropout(x)·Aᵀ)·Bᵀ`` with W [out, in] an NF4Tensor or frozen dense tensor."""
    return lora_projections(x, [LoraProj(weight, bias, lora_A, lora_B, scale, dropout)])[0]


def lora_qkv(x: torch.Tensor, q: LoraProj, k: LoraProj, v: LoraProj) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v projections of ``x`` [..., hidden]: one thin product for the three LoRA A's,
    one launch for the three base products, one transposed product for dX."""
    return lora_projections(x, [q, k, v])


def lora_o(x: torch.Tensor, o: LoraProj) -> torch.Tensor:
    """The attention output projection (a single :func:`lora_linear`)."""
    return lora_projections(x, [o])[0]


__all__ = ["LoraProj", "lora_linear", "lora_linear_reference", "lora_o", "lora_projections", "lora_qkv"]
