"""Gated MLP activations: SwiGLU ``silu(gate)·up`` and GeGLU ``gelu_tanh(gate)·up``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def act_mul_reference(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """As transformers computes it: the activation in the input dtype, then the product."""
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` for act in ("silu", "gelu_tanh")."""
    return act_mul_reference(gate, up, act)
