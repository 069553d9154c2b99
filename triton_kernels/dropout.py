"""Dropout whose mask is drawn from a counter-based generator instead of being stored.

Element e of a call keeps its value, scaled by 1/(1 − p), when its 32-bit draw ``r_e`` is at
least ``t = round(p · 2^32)`` (so it is dropped with probability t/2^32 = p to 2^-33), the
draws coming from Philox-4x32-10 keyed by a 64-bit seed read from a device tensor. The same
seed always gives the same draws, so:
  * the backward draws the mask again: ``dx = dy · mask / (1 − p)`` (dropout is linear in
    x with the mask fixed), and nothing mask-sized is saved;
  * a checkpointed recomputation that reads the same seed drops the same elements;
  * the seed lives on the device, so a CUDA graph that advances it replays fresh masks.
One Philox call gives four 32-bit draws: a program of BLOCK elements makes BLOCK/4 calls
(counters c = start/4 + q) and uses draw j of call q for element start + j·BLOCK/4 + q, so
each of its four loads and stores is contiguous. Philox's counter word is 32 bits; the
part of start/4 past 2^31 goes into the key (a program's counters share it, as BLOCK/4
divides 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _keep_scale(X, Y, offs, n, r, thresh, scale):
    inb = offs < n
    x = tl.load(X + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.where(r.to(tl.int64) >= thresh, x * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _dropout_kernel(X, Y, n, thresh, scale, SEED, BLOCK: tl.constexpr):
    Q: tl.constexpr = BLOCK // 4
    start = tl.program_id(0).to(tl.int64) * BLOCK
    c0 = start // 4
    key = tl.load(SEED) + (c0 >> 31) * 0x9E3779B1  # the counter's high part, spread over the key
    q = tl.arange(0, Q)
    r0, r1, r2, r3 = tl.randint4x(key, ((c0 & 0x7FFFFFFF) + q).to(tl.int32))
    _keep_scale(X, Y, start + q, n, r0, thresh, scale)
    _keep_scale(X, Y, start + Q + q, n, r1, thresh, scale)
    _keep_scale(X, Y, start + 2 * Q + q, n, r2, thresh, scale)
    _keep_scale(X, Y, start + 3 * Q + q, n, r3, thresh, scale)


def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x · mask / (1 − p)`` for the mask of ``seed`` (a one-element int64 tensor on x's
    device); x contiguous. Used for the forward (x) and the backward (dy) alike."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        thresh = min(round(p * 2**32), 2**32 - 1)
        _dropout_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, thresh, 1.0 / (1.0 - p), seed, BLOCK=_BLOCK)
    return y
