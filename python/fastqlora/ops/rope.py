"""Rotary position embedding applied to q and k, ``[batch, seq, heads, head_dim]``.

The rotation pairs dimension ``i`` with ``i + head_dim/2`` (transformers'
``rotate_half``). ``cos`` and ``sin`` are per-position tables ``[max_pos, head_dim/2]``
in fp32 (attention scaling already folded in), gathered by ``position_ids`` so that
packed rows can restart positions.
"""
from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
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


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, S, Hq, D]`` and k ``[B, S, Hk, D]`` by the angles of ``position_ids`` ``[B, S]``."""
    return apply_rope_reference(q, k, cos, sin, position_ids)
