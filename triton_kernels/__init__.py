"""Triton kernels of fastqlora, each with a hand-derived backward.

Installed inside the wheel as ``fastqlora.triton_kernels``. Kernels know nothing
of models: each module holds ``@triton.jit`` kernels and the launchers that call
them on contiguous tensors; ``fastqlora.ops`` wraps them in autograd Functions.
"""
