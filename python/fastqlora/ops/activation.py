"""Gated MLP activations: SwiGLU ``silu(gate)·up`` and GeGLU ``gelu_tanh(gate)·up``.

On CUDA (or under TRITON_INTERPRET) one Triton kernel computes the product and one
computes both input gradients, recomputing the activation (see
``fastqlora.triton_kernels.activation`` for the derivatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton

ACTIVATIONS = ("silu", "gelu_tanh")


def act_mul_reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """As transformers computes it: the activation in the input dtype, then the product."""
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


class _ActMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        from ..triton_kernels.activation import act_mul_forward

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return act_mul_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, dh):
        from ..triton_kernels.activation import act_mul_backward_

        gate, up = ctx.saved_tensors
        # the saved gate/up are dead after this: their storage receives the gradients
        dg, du = act_mul_backward_(dh.contiguous(), gate, up, ctx.gelu)
        return dg, du, None


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` for act in ("silu", "gelu_tanh")."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if use_triton(gate) and gate.dtype == up.dtype:
        return _ActMul.apply(gate, up, act == "gelu_tanh")
    return act_mul_reference(gate, up, act)
