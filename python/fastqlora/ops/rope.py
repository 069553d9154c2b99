"""Rotary position embedding applied to q and k, ``[batch, seq, heads, head_dim]``.

The rotation pairs dimension ``i`` with ``i + R/2`` (transformers' ``rotate_half``) for the
first ``R`` dimensions of each head: ``R = head_dim`` unless the model rotates only part of
it (Phi-4-mini), the rest passing through. ``cos`` and ``sin`` are per-position tables
``[max_pos, R/2]`` in fp32 (attention scaling already folded in), gathered by ``position_ids`` so that
packed rows can restart positions. On CUDA one Triton launch rotates q and k in place
(``fastqlora.triton_kernels.rope``); its backward is the rotation by −θ.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    if 2 * half < x.shape[-1]:  # partial rotary: the tail passes through
        return torch.cat([_rotate(x[..., :2 * half], cos, sin), x[..., 2 * half:]], dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    cos_full = torch.cat([cos, cos], dim=-1)
    sin_full = torch.cat([sin, sin], dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos_full + rotated * sin_full


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place, as transformers does: tables cast to the activations' dtype."""
    c = cos[position_ids].to(q.dtype).unsqueeze(2)  # [B, S, 1, D/2]
    s = sin[position_ids].to(q.dtype).unsqueeze(2)
    return _rotate(q, c, s), _rotate(k, c, s)


class _RoPEInPlace(torch.autograd.Function):
    """Rotates, in place, the q heads and k heads that live in one tensor ``x``: either a
    fused ``[B, S, (Hq + 2·Hk)·D]`` projection output (q, k, v side by side; one launch
    for both) or a single ``[B, S, H, D]`` tensor. One output, so autograd accepts the
    in-place change of a view."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids, heads):
        from ..triton_kernels.rope import rope_

        q, k = _views(x, heads)
        rope_(q, k, cos, sin, position_ids)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.heads = heads
        return x

    @staticmethod
    def backward(ctx, dx):
        from ..triton_kernels.rope import rope_

        cos, sin, position_ids = ctx.saved_tensors
        dx = dx.clone()  # autograd may share the incoming gradient buffer
        dq, dk = _views(dx, ctx.heads)
        rope_(dq, dk, cos, sin, position_ids, backward=True)
        return dx, None, None, None, None


class _RoPEPairInPlace(torch.autograd.Function):
    """Rotates q and k, two separate tensors, in place in one launch each way. Inputs are
    ``[B, S, H·D]`` or ``[B, S, H, D]`` and must not be views: autograd does not let one
    Function with two outputs change views in place (``heads`` = (Hq, Hk, D))."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, heads):
        from ..triton_kernels.rope import rope_

        hq, hk, d = heads
        rope_(q.view(*q.shape[:2], hq, d), k.view(*k.shape[:2], hk, d), cos, sin, position_ids)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.heads = heads
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        from ..triton_kernels.rope import rope_

        cos, sin, position_ids = ctx.saved_tensors
        hq, hk, d = ctx.heads
        # autograd or the caller may still hold the incoming buffers: rotate copies
        dq, dk = dq.clone(memory_format=torch.contiguous_format), dk.clone(memory_format=torch.contiguous_format)
        rope_(dq.view(*dq.shape[:2], hq, d), dk.view(*dk.shape[:2], hk, d), cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None, None


def _views(x: torch.Tensor, heads: tuple[int, int, int]):
    """q and k views of ``x``: heads = (Hq, Hk, D); Hk = 0 means x is [B, S, H, D] alone."""
    hq, hk, d = heads
    if hk == 0:
        return x, x[:, :, :0]
    B, S = x.shape[:2]
    return (x[..., : hq * d].unflatten(-1, (hq, d)), x[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d)))


def apply_rope_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                   sin: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Rotate the q and k parts of a fused ``[B, S, (Hq + 2·Hk)·D]`` projection output in
    one launch (in place on the Triton path); returns the tensor."""
    if use_triton(qkv) and qkv.stride(-1) == 1:
        return _RoPEInPlace.apply(qkv, cos.contiguous(), sin.contiguous(), position_ids,
                                  (num_heads, num_kv_heads, head_dim))
    q, k = _views(qkv, (num_heads, num_kv_heads, head_dim))
    q, k = apply_rope_reference(q, k, cos, sin, position_ids)
    v = qkv[..., (num_heads + num_kv_heads) * head_dim:]
    return torch.cat([q.flatten(-2), k.flatten(-2), v], dim=-1)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                  cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate two projection outputs q ``[B, S, Hq·D]`` and k ``[B, S, Hk·D]`` (one launch each
    way on the Triton path, in place when they are not views); returns ``[B, S, H, D]`` views."""
    B, S = q.shape[:2]
    for name, t, h in (("q", q, num_heads), ("k", k, num_kv_heads)):
        if t.shape[-1] != h * head_dim:
            raise ValueError(f"{name} has width {t.shape[-1]}, expected {h} heads x {head_dim} = {h * head_dim}")
    # views are rotated in one launch too when no gradient is wanted (generation's steps,
    # whose decode products return views of [M, N] outputs); autograd refuses it otherwise
    plain = (q._base is None and k._base is None) or not torch.is_grad_enabled()
    if (use_triton(q) and plain and q.is_contiguous() and k.is_contiguous()
            and q.dtype == k.dtype and head_dim % 2 == 0 and cos.shape[-1] * 2 <= head_dim):
        q, k = _RoPEPairInPlace.apply(q, k, cos.contiguous(), sin.contiguous(), position_ids,
                                      (num_heads, num_kv_heads, head_dim))
        return q.view(B, S, num_heads, head_dim), k.view(B, S, num_kv_heads, head_dim)
    return apply_rope(q.view(B, S, num_heads, head_dim), k.view(B, S, num_kv_heads, head_dim), cos, sin,
                      position_ids)


def apply_rope_qk_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                             head_dim: int, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                             keys: torch.Tensor, values: torch.Tensor,
                             row0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation's step (no gradient): rotate q ``[B, S, Hq·D]`` and k ``[B, S, Hk·D]`` as
    :func:`apply_rope_qk` does and store the rotated k and v ``[B, S, Hk, D]`` into the KV cache
    ``keys``, ``values`` ``[B, T, Hk, D]`` at rows ``row0 + s`` (``row0`` a ``[1]`` long tensor
    on the device). One launch on the Triton path (whole heads rotated, contiguous q and k),
    else the rotation and two index copies. Returns q, k as ``[B, S, H, D]``."""
    if torch.is_grad_enabled():
        raise RuntimeError("apply_rope_qk_into_cache is for generation's steps: call it under torch.no_grad()")
    B, S = q.shape[:2]
    for name, t, h in (("q", q, num_heads), ("k", k, num_kv_heads)):
        if t.shape[-1] != h * head_dim:
            raise ValueError(f"{name} has width {t.shape[-1]}, expected {h} heads x {head_dim} = {h * head_dim}")
    if (use_triton(q) and q.is_contiguous() and k.is_contiguous()
            and q.dtype == k.dtype == v.dtype == keys.dtype == values.dtype and cos.shape[-1] * 2 == head_dim and v.stride(-1) == 1 and keys.stride() == values.stride()
            and keys.stride(-1) == 1):
        from ..triton_kernels.rope import rope_

        q4, k4 = q.view(B, S, num_heads, head_dim), k.view(B, S, num_kv_heads, head_dim)
        rope_(q4, k4, cos.contiguous(), sin.contiguous(), position_ids, cache=(v, keys, values, row0))
        return q4, k4
    q4, k4 = apply_rope_qk(q, k, num_heads, num_kv_heads, head_dim, cos, sin, position_ids)
    rows = row0 if S == 1 else row0 + torch.arange(S, device=q.device)
    keys.index_copy_(1, rows, k4)
    values.index_copy_(1, rows, v)
    return q4, k4


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` by the angles of ``position_ids`` ``[B, S]``.
    The Triton path works in place on q and k and returns them."""
    if q.shape[-1] % 2 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k need one even head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if cos.shape[-1] * 2 > q.shape[-1]:
        raise ValueError(f"rope tables have {cos.shape[-1]} frequencies, more than head_dim {q.shape[-1]} / 2")
    if use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype:
        cos, sin = cos.contiguous(), sin.contiguous()
        if q._base is None and k._base is None:
            return _RoPEPairInPlace.apply(q, k, cos, sin, position_ids, (q.shape[2], k.shape[2], q.shape[3]))
        # views (of a fused projection, or reshaped outputs): autograd takes in-place changes
        # of a view only from a Function with one output, so one launch each
        q = _RoPEInPlace.apply(q, cos, sin, position_ids, (q.shape[2], 0, q.shape[3]))
        k = _RoPEInPlace.apply(k, cos, sin, position_ids, (k.shape[2], 0, k.shape[3]))
        return q, k
    return apply_rope_reference(q, k, cos, sin, position_ids)
