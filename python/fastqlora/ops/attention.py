"""Exact attention over ``[batch, seq, heads, head_dim]`` tensors.

Features every family needs: causal masking, grouped-query attention (query head ``h``
reads KV head ``h // (Hq/Hk)``), a sliding window (a query at ``i`` sees keys
``j`` with ``0 <= i - j < window``), logit soft-capping ``c·tanh(s/c)`` applied after
the scale, and packed rows: ``cu_seqlens`` (int32, ``[n+1]``) splits the flattened
``batch·seq`` tokens into sequences that never attend to each other. A padding mask
whose ones are contiguous in each row is expressed the same way (the model's
``sequence_layout`` builds cu_seqlens from masks and restarting position ids).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of each of ``total`` flattened tokens."""
    ids = torch.zeros(total, dtype=torch.int64, device=cu_seqlens.device)
    starts = cu_seqlens[1:-1].long()
    ids[starts[starts < total]] += 1
    return ids.cumsum(0)


def attention_mask_reference(
    total: int,
    causal: bool,
    sliding_window: int | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Boolean ``[total, total]`` mask of allowed (query, key) pairs over flattened tokens.

    Without ``cu_seqlens`` each row of length ``seq_len`` is its own sequence.
    """
    idx = torch.arange(total, device=device)
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens.to(device), total)
    else:
        seg = idx // (seq_len if seq_len else total)
    allowed = seg[:, None] == seg[None, :]
    diff = idx[:, None] - idx[None, :]
    if causal:
        allowed &= diff >= 0
    if sliding_window is not None:
        allowed &= diff < sliding_window
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """Dense attention in ``compute_dtype``; output in q's dtype (and the natural-log LSE
    ``[B, Hq, S]`` in fp32 when ``return_lse``). Rows with no allowed key give zeros."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    if Hq % Hk:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hk})")
    if cu_seqlens is not None and cu_seqlens.numel() >= 1 and int(cu_seqlens[-1]) != B * S:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but q has {B * S} tokens")
    scale = D**-0.5 if scale is None else scale
    rep = Hq // Hk
    T = B * S
    qf = q.reshape(T, Hq, D).to(compute_dtype).transpose(0, 1)  # [Hq, T, D]
    kf = k.reshape(T, Hk, D).to(compute_dtype).transpose(0, 1).repeat_interleave(rep, 0)
    vf = v.reshape(T, Hk, D).to(compute_dtype).transpose(0, 1).repeat_interleave(rep, 0)
    scores = (qf @ kf.transpose(1, 2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = attention_mask_reference(T, causal, sliding_window, cu_seqlens, q.device, seq_len=S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T]
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    probs = probs.masked_fill(~allowed, 0.0)
    out = (probs @ vf).transpose(0, 1).reshape(B, S, Hq, D).to(q.dtype)
    if return_lse:
        return out, lse.reshape(Hq, B, S).transpose(0, 1).float()
    return out


def _row_segments(cu_seqlens: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor | None:
    """Segment ids ``[B, S]`` when every row starts a sequence (the usual case); None when
    a sequence would cross rows."""
    if cu_seqlens is None:
        return None
    seg = segment_ids(cu_seqlens.to(device), B * S).view(B, S)
    if B > 1 and bool((seg[1:, 0] == seg[:-1, -1]).any()):
        return None
    return seg


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain-torch path (CPU, and GPU shapes the kernel does not take): torch's SDPA
    per row with a boolean mask, or the explicit reference when soft-capping."""
    B, S, Hq, D = q.shape
    seg = _row_segments(cu_seqlens, B, S, q.device)
    if softcap is not None or (cu_seqlens is not None and seg is None):
        return attention_reference(q, k, v, scale=scale, causal=causal, sliding_window=sliding_window,
                                   softcap=softcap, cu_seqlens=cu_seqlens)
    idx = torch.arange(S, device=q.device)
    diff = idx[:, None] - idx[None, :]
    allowed = torch.ones(S, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= diff >= 0
    if sliding_window is not None:
        allowed &= diff < sliding_window
    mask = allowed[None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=k.shape[2] != Hq)
    return out.transpose(1, 2)


class _FlashAttention(torch.autograd.Function):
    """The Triton flash-attention kernels (fastqlora.triton_kernels.flash_attention) over
    the flattened ``B·S`` tokens; saves q, k, v, the output and the row LSE."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal, window, softcap):
        from ..triton_kernels.flash_attention import flash_attn_forward

        B, S, Hq, D = q.shape
        q3, k3, v3 = _tokens(q), _tokens(k), _tokens(v)
        o3, lse = flash_attn_forward(q3, k3, v3, cu_seqlens, max_seqlen, scale, causal, window, softcap)
        ctx.save_for_backward(q3, k3, v3, o3, lse, cu_seqlens)
        ctx.args = (max_seqlen, scale, causal, window, softcap, q.shape, k.shape)
        return o3.view(B, S, Hq, D)

    @staticmethod
    def backward(ctx, do):
        from ..triton_kernels.flash_attention import flash_attn_backward

        q3, k3, v3, o3, lse, cu_seqlens = ctx.saved_tensors
        max_seqlen, scale, causal, window, softcap, q_shape, k_shape = ctx.args
        dq, dk, dv = flash_attn_backward(_tokens(do), q3, k3, v3, o3, lse, cu_seqlens, max_seqlen, scale, causal,
                                         window, softcap)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None, None, None, None, None


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` as ``[B·S, H, D]`` without a copy when the strides allow it."""
    B, S, H, D = x.shape
    if x.stride(-1) != 1 or (B > 1 and x.stride(0) != S * x.stride(1)):
        x = x.contiguous()
    return x.as_strided((B * S, H, D), (x.stride(1), x.stride(2), 1))


FLASH_HEAD_DIMS = (16, 32, 64, 128, 256)  # the kernels' widths (tl.arange needs a power of two)


def flash_width(head_dim: int) -> int | None:
    """The kernel width a head dim runs at: itself when it is one of FLASH_HEAD_DIMS, else the
    next one up (Phi-3.5-mini's 96 runs at 128), None past 256.

    A narrower head is zero-padded to the width: the padded columns add 0 to every score
    q·k, and v's padded columns make the output's padded columns 0, which are sliced off; the
    backward of the pad and the slice (autograd's) drops the gradients' padded columns, which
    are 0 as well (dQ = dS·K and dK = dSᵀ·Q carry K's and Q's zero columns). The scale stays
    the true head dim's. Costs the padded FLOPs (128/96 = 1.33x) and one copy of q, k and v,
    against the alternative, torch's attention with a [S, S] boolean mask."""
    for width in FLASH_HEAD_DIMS:
        if head_dim <= width:
            return width
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention of q ``[B, S, Hq, D]`` over k, v ``[B, S, Hk, D]``; returns ``[B, S, Hq, D]``.
    Flash attention in Triton on CUDA (head dims up to 256; those between the kernels' widths
    zero-padded, see :func:`flash_width`); torch elsewhere."""
    B, S, Hq, D = q.shape
    if k.shape[:2] != (B, S) or v.shape != k.shape or k.shape[-1] != D:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[2]})")
    scale = D**-0.5 if scale is None else scale
    width = flash_width(D)
    if (use_triton(q) and width is not None and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == v.dtype):
        if width != D:
            pad = (0, width - D)
            out = attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale=scale, causal=causal,
                            sliding_window=sliding_window, softcap=softcap, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen)
            return out[..., :D]
        if cu_seqlens is None:
            cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
            max_seqlen = S
        else:
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            if max_seqlen is None:
                max_seqlen = int((cu[1:] - cu[:-1]).max())
        return _FlashAttention.apply(q, k, v, cu, max_seqlen, scale, causal, sliding_window, softcap)
    return attention_torch(
        q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap, cu_seqlens=cu_seqlens
    )
