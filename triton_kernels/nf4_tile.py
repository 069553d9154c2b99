"""Dequantizing one tile of an NF4 weight inside a Triton kernel (bitsandbytes' layout).

The weight W [N, K] is stored row-major as 4-bit codes, two per byte, the even index in
the high nibble; one absmax per 64 consecutive weights, so with K a multiple of 64 a
block never crosses a row and W[n, k] uses absmax[n·K/64 + k/64]. With double
quantization the absmax is one byte: ``absmax = nested_code[a8]·nested_absmax[b/256] +
offset``. A tile covers rows ``n`` and 64-aligned columns ``k0 .. k0+BC``; the matmul
kernels call this once per step of their loop, so no 16-bit copy of W is ever written.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale(v, amax, BR: tl.constexpr, BH: tl.constexpr):
    """v [BR, BH] (every other weight of the tile) times its block's absmax [BR, BH/32]."""
    if BH == 32:
        v = v * amax
    else:
        v = tl.reshape(tl.reshape(v, (BR, BH // 32, 32)) * amax[:, :, None], (BR, BH))
    return v


@triton.jit
def nf4_tile(
    w_ptrs,
    blk,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    nested_offset,
    BR: tl.constexpr,
    BC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    OUT: tl.constexpr,
):
    """The [BR, BC] tile in dtype ``OUT``, each value ``code[q]·absmax`` computed in fp32.

    ``w_ptrs`` [BR, BC/2] points at the packed bytes of the tile; ``blk`` [BR, BC/64]
    holds the absmax block index of each 64-wide piece of each row.
    """
    b = tl.load(w_ptrs).to(tl.int32)
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + blk).to(tl.int32)
        amax = tl.load(nested_code_ptr + a8) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCK)
        amax = amax + nested_offset
    else:
        amax = tl.load(absmax_ptr + blk)
    # Byte j holds weight 2j in its high nibble and 2j+1 in its low one: decode each half
    # in the bytes' own layout, then interleave the finished values (cheap in registers;
    # interleaving the codes first made the compiler shuffle 64-bit table addresses).
    # The table lookups are per-element loads that hit L1; the compiler stages them
    # through shared memory with the other pipelined loads. Tried and slower by
    # instruction count: a register table (tl.gather, one shuffle each) and a 15-select tree.
    hi = _scale(tl.load(code_ptr + (b >> 4)), amax, BR, BC // 2).to(OUT)
    lo = _scale(tl.load(code_ptr + (b & 15)), amax, BR, BC // 2).to(OUT)
    return tl.interleave(hi, lo)
