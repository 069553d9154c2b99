"""Test-side NF4 oracle: bitsandbytes' dequantization written out in plain torch.

Independent of fastqlora's own NF4 code (checked against bitsandbytes in
test_nf4_matmul.py), so kernel tests compare against an outsider. Layout: row-major flat
index i; code of i in byte i//2, even i in the high nibble; absmax per 64 elements; with
double quantization absmax is uint8 into bnb's signed dynamic map, times
nested_absmax (per 256 blocks), plus a scalar offset.
"""
from __future__ import annotations

import torch

from fastqlora.quant import NF4Tensor


def quantize(w: torch.Tensor) -> NF4Tensor:
    """NF4 with double quantization, on w's device (fastqlora._C, bit for bit with bitsandbytes)."""
    return NF4Tensor.quantize(w, blocksize=64, compress_statistics=True)


def dequantize_oracle(t, dtype: torch.dtype) -> torch.Tensor:
    """value[i] = code[q_i]·absmax[i//64] in fp32, then cast (bitsandbytes' order)."""
    n = t.shape.numel()
    hi = (t.packed >> 4).long()
    lo = (t.packed & 15).long()
    q = torch.stack([hi, lo], -1).reshape(-1)[:n]
    if t.absmax.dtype == torch.uint8:
        idx = torch.arange(t.absmax.numel(), device=t.absmax.device) // t.nested_blocksize
        amax = t.nested_code[t.absmax.long()] * t.nested_absmax[idx] + t.nested_offset
    else:
        amax = t.absmax.float()
    vals = t.code[q] * amax.repeat_interleave(64)[:n]
    return vals.reshape(t.shape).to(dtype)


def from_bnb(packed: torch.Tensor, qs) -> NF4Tensor:
    """Our container over bitsandbytes' own quantize_4bit output (same memory)."""
    nested = qs.state2 if qs.nested else None
    return NF4Tensor(
        packed.reshape(-1), qs.absmax, torch.Size(qs.shape), qs.dtype, 64, qs.code.float(),
        nested.absmax if nested else None, nested.code.float() if nested else None,
        float(qs.offset) if nested else None,
    )
