"""Generation's projections: in a prefill or decode step (inside :func:`decoding`, no gradient
wanted) an NF4 projection of a few rows goes to the NF4 product's dispatch (the decode kernels
of csrc/nf4_gemv.cu and nf4_decode_mma.cu, the Triton tiles, or dequantize + cuBLAS) with its
LoRA term in the kernel's epilogue, instead of writing a 16-bit copy of the whole weight for a
few tokens; the projections that read one input share one thin LoRA product ``x·A_catᵀ``, a
single Triton launch (triton_kernels/thin_matmul.py). No autograd here: training's projections
are ops/lora_linear.py.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..quant import NF4Tensor
from .dispatch import decode_kernels_enabled, thin_rows_enabled, use_triton

# In generation's steps (inside `decoding()`, no gradient wanted) and at most this many rows, an
# NF4 projection may go to the NF4 product's dispatch (ops/nf4_linear.frozen_matmul: the
# decode kernels of csrc/nf4_gemv.cu and nf4_decode_mma.cu, the Triton tiles, or dequantize +
# cuBLAS, whichever it timed fastest on the first call, each checked against the plain path),
# LoRA term in the epilogue, instead of writing a 16-bit copy of the whole weight for a few
# tokens. By default only in a step captured as a CUDA graph (decoding(graphed=True)): there
# it doubled an 8B model's tokens/s, while in eager steps, bound by the host's launches, it
# was ~9% slower (H200, benchmarks/NOTES.md). FASTQLORA_DECODE_KERNELS=1/0 forces it on/off.
# Only in decoding(): a checkpointed layer's first forward also runs without gradients, and
# it must compute what its recomputation will.
DECODE_ROWS = 16
_decoding: str | None = None  # None, "eager" or "graph"


@contextlib.contextmanager
def decoding(graphed: bool = False) -> Iterator[None]:
    """Generation's prefill and decode steps (CausalLM._step; ``graphed``: a step being
    captured as a CUDA graph): few-row NF4 projections may take the NF4 dispatch."""
    global _decoding
    previous, _decoding = _decoding, ("graph" if graphed else "eager")
    try:
        yield
    finally:
        _decoding = previous


def in_decoding() -> bool:
    return _decoding is not None


def decode_route(x: torch.Tensor, weights: list) -> bool:
    """Whether projections of x with these weights go to the NF4 decode dispatch: inside
    `decoding()` (with its kernels on for this kind of step), no gradient wanted, NF4
    weights, at most DECODE_ROWS rows, on a device where the kernels run."""
    return (_decoding is not None and not torch.is_grad_enabled()
            and all(isinstance(w, NF4Tensor) for w in weights)
            and x.numel() <= DECODE_ROWS * x.shape[-1] and use_triton(x)
            and decode_kernels_enabled(graphed=_decoding == "graph"))


def thin_product(x2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x2·aᵀ`` for a decode step's few rows: one Triton launch (triton_kernels/thin_matmul.py:
    a program a row of A at a few rows, else split-K) instead of cuBLAS's split-K GEMM and
    its reduction (only under `decode_route`, where use_triton holds)."""
    from ..triton_kernels.thin_matmul import thin_matmul

    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    method = "auto" if thin_rows_enabled() else "split"
    return thin_matmul(x2, a if a.stride(-1) == 1 else a.contiguous(), method=method)


def lora_decode_group(x: torch.Tensor, weights: list, biases: list, a_cat: torch.Tensor, bs: list,
                      scale: float) -> list[torch.Tensor]:
    """``[x·Wᵢᵀ + biasᵢ + s·(x·Aᵢᵀ)·Bᵢᵀ]`` for the projections that read one x (q, k, v;
    gate, up) in a decode step: one thin product ``x·A_catᵀ`` for all of them (A_cat their A
    stacked ``[Σr, K]``), then each NF4 product with its LoRA term in the epilogue. At one
    token the thin product is a launch or two of ~5 µs whatever its width, so q, k and v
    share one instead of three (no autograd: only under `decode_route`)."""
    from .nf4_linear import frozen_matmul

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xa = thin_product(x2, a_cat)
    ranks = [b.shape[1] for b in bs]
    cols = [sum(ranks[:i]) for i in range(len(bs))]
    ys = frozen_matmul(x2, list(weights), xa=xa, lora_b=list(bs), scales=[scale] * len(bs), biases=list(biases),
                       xa_cols=cols)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def nf4_decode(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor | None,
               b: torch.Tensor | None, scale: float, x_lora: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + bias + s·(x_l·Aᵀ)·Bᵀ`` for a few rows through the NF4 dispatch (no autograd)."""
    from .nf4_linear import frozen_matmul

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xa = None
    if a is not None:
        xa = thin_product(x2 if x_lora is None else x_lora.reshape(-1, K), a)
    (y,) = frozen_matmul(x2, [weight], xa=xa, lora_b=[b] if b is not None else None, scales=[scale],
                         biases=[bias])
    return y.view(*x.shape[:-1], y.shape[-1])


