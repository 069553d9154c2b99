"""One projection with a frozen base and an optional LoRA branch:
``y = x·Wᵀ + b + s·(x_l·Aᵀ)·Bᵀ`` where ``W`` is 16-bit or NF4 and ``x_l`` is the
LoRA branch's input (``x`` itself, or ``dropout(x)``).

Backward, by hand (XA = x_l·Aᵀ, G = dY·B):
    dx   = dY·W                 (W re-dequantized, never saved in 16-bit)
    dx_l = s·G·A                (added into dx by the same addmm when x_l is x)
    dA   = s·Gᵀ·x_l,   dB = s·dYᵀ·XA
Saved: x_l and XA (thin) when the adapter trains; for NF4 only the 4-bit weight.

Every launch costs the host ~20-40 µs, and at 2 x 2048 tokens a 3B model's step was
host-bound (wall 1.8-2.6x its kernels' time on the H200; benchmarks/NOTES.md), so the
op launches as few kernels as the math allows: the LoRA term goes into the base
output through addmm's alpha (no separate scale and add), ``dx_l`` into ``dx`` likewise
when the branch reads ``x`` itself, and the 16-bit copies of A and B come from the
caller (cast once a step, :meth:`fastqlora.lora.LoraAdapter.cast_weights`). Sums of
products stay in fp32 inside each matmul; each result is rounded once.
This is the plain path that works everywhere; the fused NF4 kernels replace it on
CUDA where they are faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import NF4Tensor
from .lora_decode import decode_route, nf4_decode

Weight = torch.Tensor | NF4Tensor

def _dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Tensor):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a projection of ``x`` computes in: autocast's when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _base_product(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``y = x·Wᵀ + bias`` [..., N], its 2-D view [M, N]) with x's dtype.

    y is allocated in its final shape and written through the 2-D view: a view returned from
    a custom Function (what F.linear gives for 3-D x) may not be changed in place later, and
    RoPE rotates q and k in place. The LoRA term is then added into the 2-D view."""
    w = _dense(weight, x.dtype)
    N = w.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y2, x2 = y.view(-1, N), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, w.t(), out=y2)
    else:
        torch.addmm(bias, x2, w.t(), out=y2)
    return y, y2


def _scaled_as(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale·t`` in ``dtype`` (a parameter's gradient): one kernel for the scale and the cast."""
    if t.dtype == dtype:
        return t.mul_(scale)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, bias, lora_A, lora_B, weight, scale, a, b):
        # x_lora None: the branch reads x itself. a, b: A and B in x's dtype.
        y, y2 = _base_product(x, weight, bias)
        xa = None
        has_lora = lora_A is not None
        if has_lora:
            xl = x if x_lora is None else x_lora
            xa = F.linear(xl, a)
            y2.addmm_(xa.reshape(-1, xa.shape[-1]), b.t(), alpha=scale)
        ctx.weight, ctx.scale = weight, scale
        ctx.has_lora, ctx.same_input = has_lora, x_lora is None
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.a_dtype = lora_A.dtype if has_lora else None
        ctx.b_dtype = lora_B.dtype if has_lora else None
        saved_x = (x if x_lora is None else x_lora) if has_lora else None
        ctx.save_for_backward(saved_x, xa, a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_l, xa, a, b = ctx.saved_tensors
        s = ctx.scale
        dtype = dy.dtype
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dx_l = dA = dB = db = None
        want_x, want_xl = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_x:
            dx = dy2 @ _dense(ctx.weight, dtype)
        if ctx.has_lora:
            g = dy2 @ b  # [M, r]
            if want_x and ctx.same_input:
                dx.addmm_(g, a, alpha=s)
            elif want_xl:
                dx_l = (g @ a).mul_(s).view(x_l.shape)
            x2 = x_l.reshape(-1, x_l.shape[-1])
            if ctx.needs_input_grad[3]:
                dA = _scaled_as(g.t() @ x2, s, ctx.a_dtype)
            if ctx.needs_input_grad[4]:
                dB = _scaled_as(dy2.t() @ xa.reshape(-1, xa.shape[-1]), s, ctx.b_dtype)
        if dx is not None:
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if ctx.bias_grad:
            db = dy2.sum(0)
        return dx, dx_l, db, dA, dB, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    x_lora: torch.Tensor | None = None,
    cast: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + b (+ s·(x_lora·Aᵀ)·Bᵀ)``; ``x_lora`` defaults to ``x``.

    ``cast``: A and B already in the compute dtype (the adapter's per-step copies); by
    default they are cast here.
    """
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if x.shape[-1] != (weight.shape[1] if isinstance(weight, NF4Tensor) else weight.shape[-1]):
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects "
                         f"{weight.shape[1] if isinstance(weight, NF4Tensor) else weight.shape[-1]}")
    if x_lora is x:
        x_lora = None
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dt = compute_dtype(x)
    a = b = None
    if lora_A is not None:
        a, b = cast if cast is not None and cast[0].dtype == dt else (lora_A.to(dt), lora_B.to(dt))
    if not autocast and decode_route(x, [weight]):  # generation's few rows: the NF4 decode kernels
        return nf4_decode(x, weight, bias, a, b, scale, x_lora)
    if autocast:
        # Under autocast (Trainer's bf16=True), compute in the autocast dtype explicitly:
        # the Function's own matmuls must not be re-cast op by op.
        x = x.to(dt)
        x_lora = x_lora.to(dt) if x_lora is not None else None
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return _LoraLinear.apply(x, x_lora, bias, lora_A, lora_B, weight, scale, a, b)
    return _LoraLinear.apply(x, x_lora, bias, lora_A, lora_B, weight, scale, a, b)


class _LoraGroup(torch.autograd.Function):
    """``Yᵢ = x·Wᵢᵀ + biasᵢ + s·(x·Aᵢᵀ)·Bᵢᵀ`` for 2-3 projections that read the same x
    (q, k, v; gate, up), each with an adapter, one scale, no dropout: the adapters' A
    stacked as ``A_cat [Σr, K]`` make the thin products one launch each.

    Backward (XA = x·A_catᵀ [M, Σr], Gᵢ = dYᵢ·Bᵢ, G_cat = [Gᵢ] [M, Σr]):
        dx      = Σᵢ dYᵢ·Wᵢ + s·G_cat·A_cat     (one accumulating matmul a weight, one for LoRA)
        dA_cat  = s·G_catᵀ·x                      (one product for every adapter, cast once)
        dBᵢ     = s·dYᵢᵀ·XAᵢ                     (written side by side, scaled and cast once)
    G_cat is built transposed, [Σr, M], so each Gᵢᵀ = Bᵢᵀ·dYᵢᵀ lands in contiguous rows.
    """

    @staticmethod
    def forward(ctx, x, weights, scale, a_cat, *tensors):
        n = len(weights)
        biases, As, Bs, bs = (tensors[i * n:(i + 1) * n] for i in range(4))
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        xa = x2 @ a_cat.t()  # [M, Σr]
        ranks = [a.shape[0] for a in As]
        cols = [sum(ranks[:i]) for i in range(n)]
        ys = []
        for i, w in enumerate(weights):
            y, y2 = _base_product(x, w, biases[i])
            y2.addmm_(xa[:, cols[i]:cols[i] + ranks[i]], bs[i].t(), alpha=scale)
            ys.append(y)
        ctx.weights, ctx.scale, ctx.ranks, ctx.cols = weights, scale, ranks, cols
        ctx.dtypes = ([a.dtype for a in As], [b.dtype for b in Bs])
        ctx.bias_grad = [b is not None and b.requires_grad for b in biases]
        ctx.save_for_backward(x2, xa, a_cat, *bs)
        ctx.x_shape = x.shape
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa, a_cat, *bs = ctx.saved_tensors
        n, s = len(ctx.weights), ctx.scale
        M, dtype = x2.shape[0], x2.dtype
        need = ctx.needs_input_grad  # x, weights, scale, a_cat, biases..., As..., Bs..., bs...
        dy2 = [torch.zeros(M, b.shape[0], dtype=dtype, device=x2.device) if d is None else d.reshape(M, d.shape[-1])
               for d, b in zip(dys, bs)]
        r_all = sum(ctx.ranks)
        g_t = torch.empty(r_all, M, dtype=dtype, device=x2.device)
        for i in range(n):
            c, r = ctx.cols[i], ctx.ranks[i]
            torch.mm(bs[i].t(), dy2[i].t(), out=g_t[c:c + r])
        dx = None
        if need[0]:
            dx = dy2[0] @ _dense(ctx.weights[0], dtype)
            for i in range(1, n):
                dx.addmm_(dy2[i], _dense(ctx.weights[i], dtype))
            dx.addmm_(g_t.t(), a_cat, alpha=s)
            dx = dx.view(ctx.x_shape)
        a_dt, b_dt = ctx.dtypes
        d_a = [None] * n
        if any(need[4 + n + i] for i in range(n)):
            # one product and one scale-and-cast for every adapter's dA; each a row block of it
            da_cat = _scaled_as(g_t @ x2, s, a_dt[0]) if len(set(a_dt)) == 1 else None
            for i in range(n):
                c, r = ctx.cols[i], ctx.ranks[i]
                d_a[i] = da_cat[c:c + r] if da_cat is not None else _scaled_as(g_t[c:c + r] @ x2, s, a_dt[i])
        d_b = [None] * n
        if any(need[4 + 2 * n + i] for i in range(n)):
            sizes = [b.shape[0] * r for b, r in zip(bs, ctx.ranks)]
            flat = torch.empty(sum(sizes), dtype=dtype, device=x2.device)
            views, off = [], 0
            for i in range(n):
                v = flat[off:off + sizes[i]].view(bs[i].shape[0], ctx.ranks[i])
                torch.mm(dy2[i].t(), xa[:, ctx.cols[i]:ctx.cols[i] + ctx.ranks[i]], out=v)
                views.append((off, v.shape))
                off += sizes[i]
            if len(set(b_dt)) == 1:
                flat = _scaled_as(flat, s, b_dt[0])
                d_b = [flat[o:o + shp.numel()].view(shp) for o, shp in views]
            else:
                d_b = [_scaled_as(flat[o:o + shp.numel()].view(shp), s, b_dt[i]) for i, (o, shp) in enumerate(views)]
        d_bias = [dy2[i].sum(0) if ctx.bias_grad[i] else None for i in range(n)]
        return (dx, None, None, None, *d_bias, *d_a, *d_b, *([None] * n))


def lora_linear_group(
    x: torch.Tensor,
    weights: list[Weight],
    biases: list[torch.Tensor | None],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scale: float,
    a_cat: torch.Tensor,
    bs: list[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """The outputs of 2-3 LoRA projections of the same ``x`` (see :class:`_LoraGroup`).

    ``a_cat``: the adapters' A stacked in x's compute dtype ``[Σr, K]``; ``bs``: their B in
    it. No dropout, one scale; the caller falls back to :func:`lora_linear` otherwise.
    """
    if not 2 <= len(weights) <= 3 or not len(weights) == len(biases) == len(lora_As) == len(lora_Bs) == len(bs):
        raise ValueError("lora_linear_group takes 2 or 3 projections, each with its bias (or None), A, B and B's cast")
    K = x.shape[-1]
    for w in weights:
        k_w = w.shape[1] if isinstance(w, NF4Tensor) else w.shape[-1]
        if k_w != K:
            raise ValueError(f"input has {K} features but a weight of the group expects {k_w}")
    if tuple(a_cat.shape) != (sum(a.shape[0] for a in lora_As), K):
        raise ValueError(f"a_cat has shape {tuple(a_cat.shape)}, expected the adapters' A stacked: "
                         f"({sum(a.shape[0] for a in lora_As)}, {K})")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
        x = x.to(dt)
        biases = [b.to(dt) if b is not None else None for b in biases]
        with torch.autocast(device, enabled=False):
            return _LoraGroup.apply(x, tuple(weights), scale, a_cat, *biases, *lora_As, *lora_Bs, *bs)
    return _LoraGroup.apply(x, tuple(weights), scale, a_cat, *biases, *lora_As, *lora_Bs, *bs)
