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

from .dispatch import use_triton


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunks of rows: logits = h·Wᵀ (+b) by cuBLAS, then the Triton kernel turns them
    into per-row losses and overwrites them with the scaled dloss/dlogits, from which
    dh = G·W and (when the head trains) dW += Gᵀ·h, db += Σ G follow in the same pass.
    Backward only scales the stored gradients by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, scale, chunk_rows):
        from ..triton_kernels.cross_entropy import ce_chunk_

        h2 = hidden.reshape(-1, hidden.shape[-1])
        lab = labels.reshape(-1).contiguous()
        w = weight.to(h2.dtype)
        b = bias.to(h2.dtype) if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad = need_h or need_w or need_b
        dh = torch.empty_like(h2) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        losses = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
        for start in range(0, h2.shape[0], chunk_rows):
            hc = h2[start:start + chunk_rows]
            logits = F.linear(hc, w, b)
            losses[start:start + chunk_rows], _ = ce_chunk_(logits, lab[start:start + chunk_rows], ignore_index,
                                                            scale, softcap, write_grad=grad)
            if need_h:
                torch.matmul(logits, w, out=dh[start:start + chunk_rows])
            if need_w:
                dw.addmm_(logits.t().float(), hc.float())
            if need_b:
                db += logits.float().sum(0)
            del logits
        ctx.save_for_backward(dh, dw, db)
        ctx.shapes = (hidden.shape, weight.dtype)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, g):
        dh, dw, db = ctx.saved_tensors
        hidden_shape, wdtype = ctx.shapes
        gh = gw = gb = None
        if dh is not None:
            # scaled on the device: reading g back to skip the product when it is 1 (the
            # usual case) would wait for the whole forward before the backward's first launch
            gh = (dh * g.to(dh.dtype)).view(hidden_shape)
        if dw is not None:
            gw = (dw * g).to(wdtype)
        if db is not None:
            gb = (db * g).to(wdtype)
        return gh, gw, gb, None, None, None, None, None


def _chunk_rows(vocab: int, itemsize: int, device: torch.device) -> int:
    budget = (512 if device.type == "cuda" else 32) * 2**20  # bytes of logits alive at once
    return max(1, budget // (vocab * itemsize))


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
    """Loss of ``hidden [..., H]`` through ``weight [V, H]`` against ``labels [...]``.
    On CUDA the logits exist one chunk of rows at a time (fused kernel)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    if not use_triton(hidden):
        return linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap, num_items=num_items, bias=bias,
        )
    # the mean's scale stays on the device (no readback: the host keeps launching ahead, and a
    # CUDA graph can capture the step): 1/count in fp32, as the host would round it; with no
    # counted token 1/0 = inf and the loss 0·inf = nan, as torch's mean over nothing
    if isinstance(num_items, torch.Tensor):
        scale = (1.0 / num_items.to(device=hidden.device, dtype=torch.float32)).reshape(())
    elif num_items is not None:
        scale = 1.0 / float(num_items)
    elif reduction == "mean":
        scale = 1.0 / (labels != ignore_index).sum().to(torch.float32)
    else:
        scale = 1.0
    chunk = _chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, softcap, scale, chunk)
