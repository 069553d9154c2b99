"""Ops the models call: each a plain-torch reference (the CPU path and the test
oracle) plus, on CUDA tensors, a Triton kernel wrapped in an autograd Function with
a hand-written backward. :func:`backend` forces one side for a block of code."""
from .activation import act_mul
from .attention import attention
from .cross_entropy import linear_cross_entropy
from .dispatch import backend, current_backend, use_triton
from .rms_norm import rms_norm
from .rope import apply_rope, apply_rope_qk, apply_rope_qk_into_cache, apply_rope_qkv

__all__ = [
    "act_mul",
    "apply_rope",
    "apply_rope_qk",
    "apply_rope_qk_into_cache",
    "attention",
    "backend",
    "current_backend",
    "linear_cross_entropy",
    "rms_norm",
    "use_triton",
]
