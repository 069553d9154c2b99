"""The LoRA gated MLP ``down(act(gate(x))·up(x))`` as one autograd Function.

Each of gate, up, down is a :class:`LoraProj` (NF4 or dense frozen weight + adapter); act
is "silu" (SwiGLU) or "gelu_tanh" (GeGLU). The Function keeps only x and the thin LoRA
products; the [M, I] activations are recomputed in the backward, which takes the
fewest products (see :class:`_LoraMLP`). With dropout on any projection the MLP runs as
three :func:`lora_linear` calls (slower path, PEFT's per-layer masks drawn in the order
gate, up, down).
"""
from __future__ import annotations

import math

import torch

from .activation import ACTIVATIONS, act_mul
from .dispatch import current_backend, use_triton
from .lora_fused import LoraProj, check_proj, lora_linear_reference, lora_projections
from .nf4_linear import frozen_matmul, frozen_matmul_t


def gated_act_bwd_reference(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str):
    """(h, dg, du) in fp32 math for ``h = act(g)·u`` and incoming dh."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    if act == "silu":
        sig = torch.sigmoid(gf)
        a = gf * sig
        da = sig * (1 + gf * (1 - sig))
    else:
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (gf + 0.044715 * gf**3))
        a = 0.5 * gf * (1 + t)
        da = 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * c * (1 + 3 * 0.044715 * gf * gf)
    return (a * uf).to(g.dtype), (dhf * uf * da).to(g.dtype), (dhf * a).to(g.dtype)


def _gated_act_bwd_(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str) -> None:
    """In place: dh ← h, g ← dg, u ← du."""
    if use_triton(g):
        from ..triton_kernels.activation import act_mul_backward_

        act_mul_backward_(dh, g, u, act == "gelu_tanh", store_h=True)
        return
    h, dg, du = gated_act_bwd_reference(g, u, dh, act)
    dh.copy_(h)
    g.copy_(dg)
    u.copy_(du)


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return torch.mm(a, b).mul_(s)


class _LoraMLP(torch.autograd.Function):
    """``G = X·Wgᵀ + sg·XAg·Bgᵀ``, ``U`` likewise, ``H = act(G)·U``, ``Y = H·Wdᵀ + sd·HAd·Bdᵀ``
    with ``XA = X·[Ag; Au]ᵀ`` (one thin product) and ``HAd = H·Adᵀ``.

    Saved: X, XA [M, rg+ru], HAd [M, rd]. Backward from dY, 5 large products:
      Pd = sd·dY·Bd;  dBd = sd·dYᵀ·HAd;  dH = dY·Wd + Pd·Ad          (transposed product 1)
      G, U recomputed from X and XA                                  (products 2, 3; one launch)
      H, dG = dH·U·act'(G), dU = dH·act(G)    in place over dH, G, U
      dAd = Pdᵀ·H;  dBg = sg·dGᵀ·XAg;  dBu = su·dUᵀ·XAu
      P = [sg·dG·Bg | su·dU·Bu];  [dAg; dAu] = Pᵀ·X
      dX = dG·Wg + dU·Wu + P·[Ag; Au]                                  (products 4, 5; one launch)
    Biases: dbias = column sums of dY, dG, dU.
    """

    @staticmethod
    def forward(ctx, x, weights, scales, act, *tensors):
        biases, As, Bs = tensors[0:3], tensors[3:6], tensors[6:9]
        H = x.shape[-1]
        dtype = x.dtype
        x2 = x.reshape(-1, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        wg, wu, wd = weights
        sg, su, sd = scales
        rg = As[0].shape[0] if As[0] is not None else 0
        ru = As[1].shape[0] if As[1] is not None else 0
        gu_a = [a.to(dtype) for a in As[:2] if a is not None]
        a_gu = torch.cat(gu_a) if gu_a else None
        xa = x2 @ a_gu.t() if a_gu is not None else None
        bs = [b.to(dtype) if b is not None else None for b in Bs]
        bias_c = [b.to(dtype) if b is not None else None for b in biases]
        g, u = frozen_matmul(x2, [wg, wu], xa=xa, lora_b=bs[:2], scales=[sg, su], biases=bias_c[:2], xa_cols=[0, rg])
        h = act_mul(g, u, act)
        del g, u
        had = h @ As[2].to(dtype).t() if As[2] is not None else None
        (y,) = frozen_matmul(h, [wd], xa=had, lora_b=bs[2:], scales=[sd], biases=bias_c[2:])
        ctx.weights, ctx.scales, ctx.act, ctx.ranks = weights, scales, act, (rg, ru)
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, xa, had, a_gu, *As, *Bs, *biases)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, had, a_gu = ctx.saved_tensors[:4]
        As, Bs, biases = ctx.saved_tensors[4:7], ctx.saved_tensors[7:10], ctx.saved_tensors[10:13]
        need = ctx.needs_input_grad  # x, weights, scales, act, biases[3], As[3], Bs[3]
        wg, wu, wd = ctx.weights
        sg, su, sd = ctx.scales
        rg, ru = ctx.ranks
        dtype = x2.dtype
        M = x2.shape[0]
        dy = dy.reshape(M, dy.shape[-1])
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        lg, lu, ld = (a is not None for a in As)
        bs = [b.to(dtype) if b is not None else None for b in Bs]
        bias_c = [b.to(dtype) if b is not None else None for b in biases]

        grads_a = [None] * 3
        grads_b = [None] * 3
        # need: x 0, weights 1, scales 2, act 3, bias g/u/d 4-6, A g/u/d 7-9, B g/u/d 10-12
        pd = _mm_scaled(dy, bs[2], sd) if ld else None
        if ld and need[12]:
            grads_b[2] = _mm_scaled(dy.t(), had, sd).to(Bs[2].dtype)
        dh = frozen_matmul_t([dy], [wd], p=pd, a_cat=As[2].to(dtype) if ld else None)
        g, u = frozen_matmul(x2, [wg, wu], xa=xa, lora_b=bs[:2], scales=[sg, su], biases=bias_c[:2], xa_cols=[0, rg])
        _gated_act_bwd_(g, u, dh, ctx.act)
        h, dg, du = dh, g, u
        if ld and need[9]:
            grads_a[2] = (pd.t() @ h).to(As[2].dtype)
        del h, dh
        d_bias = [None] * 3
        for i, d in enumerate((dg, du, dy)):
            if need[4 + i]:
                d_bias[i] = d.sum(0).to(biases[i].dtype)

        parts = []
        for i, (on, d, cols) in enumerate(((lg, dg, slice(0, rg)), (lu, du, slice(rg, rg + ru)))):
            if not on:
                continue
            if need[10 + i]:
                grads_b[i] = _mm_scaled(d.t(), xa[:, cols], ctx.scales[i]).to(Bs[i].dtype)
            parts.append(_mm_scaled(d, bs[i], ctx.scales[i]))
        p = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
        if p is not None and (need[7] or need[8]):
            da = p.t() @ x2  # [dAg; dAu] in one thin product
            if lg and need[7]:
                grads_a[0] = da[:rg].to(As[0].dtype)
            if lu and need[8]:
                off = rg if lg else 0
                grads_a[1] = da[off:off + ru].to(As[1].dtype)
        dx = frozen_matmul_t([dg, du], [wg, wu], p=p, a_cat=a_gu) if need[0] else None
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None, *d_bias, *grads_a, *grads_b)


def lora_mlp_reference(x: torch.Tensor, gate: LoraProj, up: LoraProj, down: LoraProj, act: str) -> torch.Tensor:
    """PEFT's computation in plain torch: three LoRA linears and the activation."""
    g = lora_linear_reference(x, gate)
    u = lora_linear_reference(x, up)
    return lora_linear_reference(act_mul(g, u, act), down)


def lora_mlp(x: torch.Tensor, gate: LoraProj, up: LoraProj, down: LoraProj, act: str = "silu") -> torch.Tensor:
    """``down(act(gate(x))·up(x))`` for x [..., hidden]; act "silu" or "gelu_tanh"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    inter = int(gate.weight.shape[0])
    if int(down.weight.shape[1]) != inter or int(up.weight.shape[0]) != inter:
        raise ValueError(
            f"MLP shapes do not chain: gate {tuple(gate.weight.shape)}, up {tuple(up.weight.shape)}, "
            f"down {tuple(down.weight.shape)}; expected gate and up [I, H] and down [H, I]"
        )
    for p, k in ((gate, x.shape[-1]), (up, x.shape[-1]), (down, inter)):
        check_proj(p, k)
    projs = (gate, up, down)
    if current_backend() == "reference" or any(isinstance(p.weight, torch.Tensor) and p.weight.requires_grad for p in projs):
        return lora_mlp_reference(x, gate, up, down, act)
    if any(p.has_lora and p.dropout > 0 for p in projs):
        g, u = lora_projections(x, [gate]), lora_projections(x, [up])
        return lora_projections(act_mul(g[0], u[0], act), [down])[0]
    tensors = (
        [p.bias for p in projs]
        + [p.lora_A if p.has_lora else None for p in projs]
        + [p.lora_B if p.has_lora else None for p in projs]
    )
    return _LoraMLP.apply(x, tuple(p.weight for p in projs), tuple(float(p.scale) for p in projs), act, *tensors)
