"""Choosing between an op's Triton kernel and its plain-torch reference.

``auto`` (the default) runs kernels on CUDA tensors and the reference elsewhere.
``reference`` always runs the reference; ``triton`` always runs the kernel, which on
CPU tensors needs ``TRITON_INTERPRET=1`` (how CI tests kernels without a GPU).
``FASTQLORA_BACKEND`` sets the starting mode; :func:`backend` changes it for a block.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_MODES = ("auto", "reference", "triton")
_mode = os.environ.get("FASTQLORA_BACKEND", "auto")
if _mode not in _MODES:
    raise ValueError(f"FASTQLORA_BACKEND={_mode!r}: expected one of {', '.join(_MODES)}")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_backend() -> str:
    return _mode


@contextlib.contextmanager
def backend(mode: str) -> Iterator[None]:
    """Run the enclosed block with ops in ``mode`` ("auto", "reference" or "triton")."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"backend must be one of {', '.join(_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should launch its Triton kernel."""
    if _mode == "reference":
        return False
    if _mode == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for but triton is not installed")
        if not x.is_cuda and not interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return x.is_cuda and triton_available()


def fused_nf4_enabled(x: torch.Tensor) -> bool:
    """Whether the model's projections take the fused NF4 LoRA ops (ops/lora_fused.py,
    ops/lora_mlp.py) instead of the plain dequantize + matmul op: on CUDA tensors when
    ``FASTQLORA_NF4_FUSED=1`` (off by default until their end-to-end benchmark says on)."""
    return x.is_cuda and _mode != "reference" and os.environ.get("FASTQLORA_NF4_FUSED", "0") == "1"


def _switch(name: str, off: str, on: str, default: str = "0") -> bool:
    """An environment switch: "0" or "1" (``default`` when unset); anything else is refused by name."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 ({off}) or 1 ({on})")
    return value == "1"


def grouped_lora_enabled() -> bool:
    """Whether projections that read the same input (q, k, v; gate, up) run as one grouped
    LoRA op (ops.lora_linear_group: ~7 fewer launches a group and step) instead of one op
    each: when ``FASTQLORA_GROUPED_LORA=1``. Off by default: measured once each on two models
    on the H200, it gained 10% on one and nothing on the other (benchmarks/NOTES.md)."""
    return _switch("FASTQLORA_GROUPED_LORA", "one op a projection", "grouped")


def decode_kernels_enabled(graphed: bool = False) -> bool:
    """Whether generation's few-row NF4 projections go to the NF4 dispatch (the decode
    kernels; ops.lora_decode.decoding) instead of dequantize + cuBLAS: by default in steps
    captured as a CUDA graph (``graphed``) and not in eager ones, where launches bound the
    step; ``FASTQLORA_DECODE_KERNELS=1`` / ``0`` forces it on / off."""
    return _switch("FASTQLORA_DECODE_KERNELS", "dequantize + cuBLAS", "the NF4 dispatch",
                   default="1" if graphed else "0")


def shared_decode_launch_enabled() -> bool:
    """Whether the tensor-core decode runs the weights that read one x (q, k, v; gate, up) in
    one launch (ops.nf4_decode_mma.nf4_decode_mma_many) instead of one launch a weight: on
    unless ``FASTQLORA_DECODE_SHARED_LAUNCH=0`` (kept for the A/B of bench_generate.py)."""
    return _switch("FASTQLORA_DECODE_SHARED_LAUNCH", "one launch a weight", "one launch for the weights of one x",
                   default="1")


def thin_rows_enabled() -> bool:
    """Whether a decode step's thin LoRA product ``x·Aᵀ`` at a few rows (thin_matmul's
    `rows_kernel_fits`) takes the kernel of a program a row of A (triton_kernels/thin_matmul.py,
    no split) instead of the split-K one: on unless ``FASTQLORA_THIN_ROWS=0`` (kept for the A/B of bench_generate.py)."""
    return _switch("FASTQLORA_THIN_ROWS", "split-K", "a program a row of A", default="1")


def decode_graph_enabled() -> bool:
    """Whether generation replays its decode step as a CUDA graph (fastqlora.decode_graph)
    instead of launching each kernel from Python: on unless ``FASTQLORA_DECODE_GRAPH=0``."""
    return _switch("FASTQLORA_DECODE_GRAPH", "eager steps", "a CUDA graph", default="1")


def decode_attention_enabled() -> bool:
    """Whether a decode step's attention (one query a row over the KV cache) runs as the
    Triton kernels of triton_kernels/decode_attention.py (two launches a layer) instead of
    the torch ops of generation.cached_attention (~16): on unless
    ``FASTQLORA_DECODE_ATTENTION=0``. On the H200 the graphed decode step went 8.62 -> 6.50
    ms a token at Llama-3-8B batch 1 and 3.56 -> 2.50 at Llama-3.2-1B (benchmarks/NOTES.md)."""
    return _switch("FASTQLORA_DECODE_ATTENTION", "torch ops", "the Triton kernels", default="1")
