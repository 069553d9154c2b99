"""Cross-entropy of ``hidden · Wᵀ`` against labels, for the lm_head and the loss.

Labels arrive already aligned with ``hidden`` (the caller shifts them); positions
labelled ``ignore_index`` do not count. ``reduction="mean"`` averages over counted
tokens, ``"sum"`` sums them; ``num_items`` (transformers' ``num_items_in_batch``)
divides the sum by a count taken over a whole accumulated batch. ``softcap`` is
Gemma 2's final logit soft-cap ``c·tanh(z/c)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materializes the logits: logits in the hidden dtype, loss math in fp32."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.reshape(-1)
    if num_items is not None:
        return F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum") / num_items
    return F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of ``hidden [..., H]`` through ``weight [V, H]`` against ``labels [...]``."""
    return linear_cross_entropy_reference(
        hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, num_items=num_items, bias=bias,
    )
