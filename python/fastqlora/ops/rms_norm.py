"""RMSNorm: ``y = x / sqrt(mean(x²) + eps) · (offset + w)``.

``offset=0`` is Llama/Mistral/Qwen: normalize in fp32, cast to the input dtype, then
multiply by the weight in the weight's dtype (transformers' LlamaRMSNorm).
``offset=1`` is Gemma: everything in fp32, ``(1 + w)``, one cast at the end.
On CUDA (or under TRITON_INTERPRET) the Triton kernels of
``fastqlora.triton_kernels.rms_norm`` run, with the backward derived there.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * (xf * inv_rms).to(x.dtype)
    return ((xf * inv_rms) * (offset + weight.float())).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        from ..triton_kernels.rms_norm import rms_norm_forward

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, r = rms_norm_forward(x2d, weight, eps, gemma)
        ctx.save_for_backward(x2d, weight, r)
        ctx.gemma = gemma
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from ..triton_kernels.rms_norm import rms_norm_backward

        x2d, weight, r = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = rms_norm_backward(dy2d, x2d, weight, r, ctx.gemma, ctx.needs_input_grad[1])
        return dx.view(dy.shape), (dw.to(weight.dtype) if dw is not None else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton kernel on CUDA, reference elsewhere."""
    if offset not in (0.0, 1.0):
        raise ValueError(f"RMSNorm offset must be 0 (Llama) or 1 (Gemma), got {offset}")
    if use_triton(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _RMSNorm.apply(x, weight, eps, offset == 1.0)
    return rms_norm_reference(x, weight, eps, offset)
