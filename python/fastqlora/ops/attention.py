"""Exact attention over ``[batch, seq, heads, head_dim]`` tensors.

Features every family needs: causal masking, grouped-query attention (query head ``h``
reads KV head ``h // (Hq/Hk)``), a sliding window (a query at ``i`` sees keys
``j`` with ``0 <= i - j < window``), logit soft-capping ``c·tanh(s/c)`` applied after
the scale, and packed rows: ``cu_seqlens`` (int32, ``[n+1]``) splits the flattened
``batch·seq`` tokens into sequences that never attend to each other. A padding mask
whose ones are contiguous in each row is expressed the same way (see
:func:`segments_from_attention_mask`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """Attention of q ``[B, S, Hq, D]`` over k, v ``[B, S, Hk, D]``; returns ``[B, S, Hq, D]``."""
    return attention_torch(
        q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap, cu_seqlens=cu_seqlens
    )


def segments_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cu_seqlens over the flattened ``[B, S]`` tokens for a 0/1 padding mask whose ones
    are contiguous in each row (left or right padding): each run of real tokens is one
    sequence and each run of padding another, so real tokens never see padding."""
    B, S = attention_mask.shape
    m = attention_mask.to(torch.int64)
    change = torch.ones(B, S, dtype=torch.bool, device=m.device)
    change[:, 1:] = m[:, 1:] != m[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).flatten()
    end = torch.tensor([B * S], device=m.device)
    return torch.cat([starts, end]).to(torch.int32)
